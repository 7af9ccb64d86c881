"""Flax's MNIST examples (NNX, and Linen with split jits) on the bundled digits, ERM or AMP."""
