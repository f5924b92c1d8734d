"""The model: the language model, its recurrent cells (LSTM, GRU), dropout strategies, the loss."""
