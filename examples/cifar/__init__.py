"""CIFAR-10/100 example: models, a safe data loader with on-device augmentation, training."""
