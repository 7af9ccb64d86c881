"""CIFAR models in Flax Linen, all with BatchNorm.

Every model takes NHWC images and is applied as::

    variables = model.init(rng, x, train=False)        # {'params', 'batch_stats'}
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    logits = model.apply(variables, x, train=False)     # running statistics

The architectures follow the ones used for CIFAR in the AMP paper (Zheng et al., CVPR 2021):
pre-activation ResNet-18, WideResNet-28-10 and VGG-16 with BatchNorm. Convolutions use He-normal
(fan-out) initialisation, BatchNorm has PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum``
0.9, epsilon 1e-5) so that recipes tuned in PyTorch carry over. ``TinyCNN`` is a small network for
``--quick`` runs and tests on CPU.

Which parameter arrays exist matters for AMP with ``norm="per_tensor"``: every array gets its own
ball of radius epsilon. The layers therefore keep the biases the authors' PyTorch models have
(convolution biases in the pre-activation blocks and in VGG, none in WideResNet).
"""

from collections.abc import Callable
from collections.abc import Sequence
import functools
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# He-normal with fan-out, as torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


def _conv(features: int, kernel: int, stride: int, use_bias: bool, dtype: Dtype,
          name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=use_bias,
                 kernel_init=conv_init, dtype=dtype, name=name)


def _classifier(x: jnp.ndarray, num_classes: int, dtype: Dtype) -> jnp.ndarray:
  x = nn.Dense(num_classes, kernel_init=dense_init, dtype=dtype, name="classifier")(x)
  return x.astype(jnp.float32)


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU, then two 3x3 convolutions, plus a shortcut.

  The shortcut is a 1x1 convolution of the pre-activated input when the shape changes.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    out = nn.relu(_batch_norm(train, self.dtype)(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, True, self.dtype, name="shortcut")(out)
    else:
      shortcut = x
    y = _conv(self.features, 3, self.stride, True, self.dtype)(out)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    y = _conv(self.features, 3, 1, True, self.dtype)(y)
    return y + shortcut


class PreActResNet(nn.Module):
  """Pre-activation ResNet (He et al., 2016) for 32x32 inputs.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: number of blocks in each stage; ``(2, 2, 2, 2)`` is ResNet-18.
    width: channels of the first stage; each later stage doubles it.
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = _conv(self.width, 3, 1, False, self.dtype, name="stem")(x.astype(self.dtype))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = PreActBlock(self.width * 2**i, stride, self.dtype)(x, train)
    x = nn.relu(_batch_norm(train, self.dtype, name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return _classifier(x, self.num_classes, self.dtype)


class WideBlock(nn.Module):
  """WideResNet block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (stride on the second), no biases."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = nn.relu(_batch_norm(train, self.dtype)(x))
    y = _conv(self.features, 3, 1, False, self.dtype)(y)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    y = _conv(self.features, 3, self.stride, False, self.dtype)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, False, self.dtype, name="shortcut")(x)
    return y + x


class WideResNet(nn.Module):
  """WideResNet-``depth``-``widen_factor`` (Zagoruyko and Komodakis, 2016).

  Attributes:
    num_classes: number of output logits.
    depth: total depth, ``6 n + 4`` with ``n`` blocks per stage (28 gives n = 4; 10 gives 1).
    widen_factor: width multiplier ``k``; stages have ``16k, 32k, 64k`` channels.
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int = 10
  depth: int = 28
  widen_factor: int = 10
  dtype: Dtype = jnp.float32

  def _blocks_per_stage(self) -> int:
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), "
                       f"got {self.depth}.")
    return (self.depth - 4) // 6

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    n = self._blocks_per_stage()
    x = _conv(16, 3, 1, False, self.dtype, name="stem")(x.astype(self.dtype))
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x = WideBlock(width * self.widen_factor, stride, self.dtype)(x, train)
    x = nn.relu(_batch_norm(train, self.dtype, name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return _classifier(x, self.num_classes, self.dtype)


VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
  """VGG with BatchNorm after every convolution and a 3-layer classifier.

  Attributes:
    num_classes: number of output logits.
    stages: channels of the 3x3 convolutions of each stage; every stage ends with a 2x2 max pool.
      The default is VGG-16.
    hidden: width of the two hidden classifier layers (4096 in VGG-16).
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int = 10
  stages: Sequence[Sequence[int]] = VGG16_STAGES
  hidden: int = 4096
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    for stage in self.stages:
      for features in stage:
        x = _conv(features, 3, 1, True, self.dtype)(x)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype)(x))
    return _classifier(x, self.num_classes, self.dtype)


class TinyCNN(nn.Module):
  """A small conv net (two conv-BN-ReLU-pool stages and a linear head) for quick CPU runs.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first convolution (the second has twice as many).
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int = 10
  width: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    for features in (self.width, 2 * self.width):
      x = _conv(features, 3, 1, False, self.dtype)(x)
      x = nn.relu(_batch_norm(train, self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return _classifier(x, self.num_classes, self.dtype)


def _wrn(name: str) -> tuple[int, int] | None:
  match = re.fullmatch(r"(?:wrn|wideresnet)[-_]?(\d+)[-_x](\d+)", name)
  return (int(match.group(1)), int(match.group(2))) if match else None


MODELS: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": PreActResNet,
    "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
    "vgg16": VGG,
    "tiny_cnn": TinyCNN,
}


def model_names() -> list[str]:
  """Names :func:`get_model` accepts (besides any ``wrn{depth}_{width}``)."""
  return sorted(MODELS)


def get_model(name: str, num_classes: int = 10, dtype: Dtype = jnp.float32,
              **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: ``"preactresnet18"``, ``"wrn28_10"`` (or any ``"wrn{depth}_{width}"``, e.g.
      ``"wrn16_8"``; ``"wrn10_1"`` is tiny), ``"vgg16"`` or ``"tiny_cnn"``. Case and ``-`` vs
      ``_`` do not matter.
    num_classes: number of output logits (10 for CIFAR-10, 100 for CIFAR-100).
    dtype: computation dtype, e.g. ``jnp.bfloat16`` on accelerators; parameters and BatchNorm
      statistics stay float32 and logits are returned as float32.
    **kwargs: other attributes of the model class (e.g. ``width`` of ``TinyCNN``).

  Returns:
    An unbound Flax Linen module.
  """
  key = name.lower().replace("-", "_")
  if key in MODELS:
    return MODELS[key](num_classes=num_classes, dtype=dtype, **kwargs)
  wrn = _wrn(key)
  if wrn is not None:
    depth, width = wrn
    return WideResNet(num_classes=num_classes, depth=depth, widen_factor=width, dtype=dtype,
                      **kwargs)
  raise ValueError(f"Unknown model {name!r}; choose one of {model_names()} or "
                   "'wrn{depth}_{width}' such as 'wrn16_8'.")
