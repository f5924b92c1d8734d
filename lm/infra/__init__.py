"""Infrastructure: checkpoints and atomic writes, faults and signals, the error boundary."""
