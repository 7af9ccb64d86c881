"""The study's models: one CNN architecture at two widths (and a tiny one for the smoke test)."""

import flax.linen as nn
import jax.numpy as jnp

from examples.cifar import models as cifar_models


def _conv_bn_relu_pool(x: jnp.ndarray, features: int, train: bool) -> jnp.ndarray:
  x = nn.Conv(features, (3, 3), padding=1, use_bias=False, kernel_init=cifar_models.conv_init)(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
  return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))


class MidCNN(nn.Module):
  """Three conv-BN-ReLU-pool stages, a BN-ReLU hidden dense layer, a linear head.

  The study's two sizes are this architecture at two widths: ``mid`` (16, 32, 64 channels,
  hidden 128: 160k parameters) and ``small`` (8, 16, 32, hidden 64: 39k parameters, a third of
  the compute). ``examples.cifar.models.TinyCNN`` (global average pooling, 5k parameters) is
  not in the study: it underfits 1,000 images (training loss 1.49 after 40 epochs, measured),
  so no regulariser can help it.

  Attributes:
    num_classes: number of output logits.
    widths: channels of the conv stages.
    hidden: width of the hidden dense layer.
  """

  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for w in self.widths:
      x = _conv_bn_relu_pool(x, w, train)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=False, kernel_init=cifar_models.dense_init)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    return nn.Dense(self.num_classes, kernel_init=cifar_models.dense_init)(x)


MODEL_NAMES = ("small", "mid", "tiny", "micro")


def get_model(name: str) -> nn.Module:
  """``small`` / ``mid`` (the study's), ``tiny`` (TinyCNN), ``micro`` (the smoke test's)."""
  if name == "small":
    return MidCNN(widths=(8, 16, 32), hidden=64)
  if name == "mid":
    return MidCNN()
  if name == "tiny":
    return cifar_models.TinyCNN(num_classes=10, width=16)
  if name == "micro":  # seconds to compile and run.
    return MidCNN(widths=(4, 4, 4), hidden=8)
  raise ValueError(f"unknown model {name!r}: use one of {MODEL_NAMES}")

