"""Evaluation: is an explanation faithful, and what does it say about the model (see ``metrics``)."""
