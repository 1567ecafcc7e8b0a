"""Training the life module: the synthetic task, the two-stage loop, the embedded default model."""
