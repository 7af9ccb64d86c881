"""Equinox's MNIST CNN and stateful (BatchNorm) examples on the bundled digits, ERM vs AMP."""
