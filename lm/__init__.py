"""PTB LSTM language models (Zaremba et al. 2014): data, model, training, evaluation, reports."""
