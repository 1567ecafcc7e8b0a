"""Measuring the method: accuracy/GFLOPs tables and the model-only speed bench."""
