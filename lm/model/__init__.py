"""The model: the language model, dropout strategies, the recurrence (time loop), the loss."""
