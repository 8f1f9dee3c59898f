"""Synthetic ground truth: activations with known features and pairs, and the scores of a
dictionary against them."""
