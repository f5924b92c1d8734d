"""The engine: the training step and epoch, the run (folder, resume, metrics), evaluation, model
averaging, generation, data parallelism."""
