"""Corpora: files, vocabulary, encoded splits (``corpus``); streams and BPTT windows (``batching``)."""
