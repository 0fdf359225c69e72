"""Continual learning with LIDs: Split-MNIST scenarios, baselines, metrics and the LID learner."""
