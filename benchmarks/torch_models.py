"""PyTorch twins of the benchmark models, and an AMP train step written from the algorithm.

Used only by :mod:`benchmarks.step_time` to put the JAX step next to a PyTorch one on the same
model and batch. The architectures mirror ``examples/cifar/models.py`` layer for layer
(``PreActResNet`` with ResNet-18 stage sizes, ``TinyCNN``); initialisation is PyTorch's default,
which does not change the cost of a step. Importing this module needs ``torch``.

The AMP step (:class:`AmpSGD`) follows Zheng et al. (CVPR 2021), Algorithm 1, with the
per-tensor ball of the authors' code:

1. clean forward/backward at ``theta``: loss and gradient ``g``;
2. ``K`` times: ``delta <- Proj_eps(delta + inner_lr * g)`` tensor by tensor, then ``g`` is the
   gradient at ``theta + delta`` (BatchNorm running statistics of these passes are discarded);
3. restore ``theta`` and take an SGD step (momentum, optional Nesterov, L2 weight decay added to
   the gradient) with the last ``g``.

This is the same update as ``optax.chain(amp_optax.amp(eps, inner_lr=inner_lr, inner_steps=K),
optax.add_decayed_weights(wd), optax.sgd(lr, momentum, nesterov))``.
"""

from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812


class PreActBlock(nn.Module):
  """Pre-activation basic block, as ``examples.cifar.models.PreActBlock``."""

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_features)
    self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=True)
    self.bn2 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
    self.shortcut = None
    if stride != 1 or in_features != features:
      self.shortcut = nn.Conv2d(in_features, features, 1, stride, 0, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if self.shortcut is not None else x
    y = self.conv1(out)
    y = self.conv2(F.relu(self.bn2(y)))
    return y + shortcut


class PreActResNet(nn.Module):
  """Pre-activation ResNet for 32x32 inputs; ``(2, 2, 2, 2)`` blocks is ResNet-18."""

  def __init__(self, num_classes: int = 10, stage_sizes: Sequence[int] = (2, 2, 2, 2),
               width: int = 64):
    super().__init__()
    self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    blocks, features = [], width
    for i, num_blocks in enumerate(stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(PreActBlock(features, width * 2**i, stride))
        features = width * 2**i
    self.blocks = nn.Sequential(*blocks)
    self.final_bn = nn.BatchNorm2d(features)
    self.classifier = nn.Linear(features, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.blocks(self.stem(x))
    x = F.relu(self.final_bn(x))
    return self.classifier(x.mean(dim=(2, 3)))


class TinyCNN(nn.Module):
  """Two conv-BN-ReLU-maxpool stages and a linear head, as ``examples.cifar.models.TinyCNN``."""

  def __init__(self, num_classes: int = 10, width: int = 16):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(2 * width)
    self.classifier = nn.Linear(2 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
    x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
    return self.classifier(x.mean(dim=(2, 3)))


def get_model(name: str, num_classes: int = 10) -> nn.Module:
  """``"preactresnet18"`` or ``"tiny_cnn"``, the names of ``examples.cifar.models``."""
  if name == "preactresnet18":
    return PreActResNet(num_classes)
  if name == "tiny_cnn":
    return TinyCNN(num_classes)
  raise ValueError(f"no PyTorch twin of {name!r}; use 'preactresnet18' or 'tiny_cnn'.")


class AmpSGD:
  """One AMP (or, with ``inner_steps=0``, plain ERM) train step on a PyTorch model.

  Args:
    model: the network; its trainable parameters are perturbed, each within its own L2 ball.
    lr: SGD learning rate.
    momentum: SGD momentum.
    weight_decay: L2 weight decay, added to the gradient (PyTorch's SGD convention).
    nesterov: Nesterov momentum.
    epsilon: radius of each parameter tensor's perturbation ball.
    inner_lr: step size of the inner ascent.
    inner_steps: number ``K`` of ascent steps; 0 gives the ERM step.

  Examples:
    >>> import torch
    >>> model = TinyCNN()
    >>> step = AmpSGD(model, lr=0.1, epsilon=0.5, inner_lr=1.0, inner_steps=1)
    >>> loss = step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
  """

  def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
               weight_decay: float = 5e-4, nesterov: bool = True, epsilon: float = 0.5,
               inner_lr: float = 1.0, inner_steps: int = 1):
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, nesterov=nesterov)
    self.epsilon = epsilon
    self.inner_lr = inner_lr
    self.inner_steps = inner_steps

  def _loss_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for p in self.params:
      p.grad = None
    loss = F.cross_entropy(self.model(x), y)
    loss.backward()
    return loss

  def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Takes one step on the batch ``(x, y)``; returns the clean loss (a 0-d tensor)."""
    self.model.train()
    loss = self._loss_and_grad(x, y)
    if self.inner_steps > 0:
      buffers = [b.detach().clone() for b in self.model.buffers()]
      with torch.no_grad():
        theta = [p.detach().clone() for p in self.params]
        delta = [torch.zeros_like(p) for p in self.params]
      for _ in range(self.inner_steps):
        with torch.no_grad():
          for p, t, d in zip(self.params, theta, delta, strict=True):
            d.add_(p.grad, alpha=self.inner_lr)
            norm = torch.linalg.vector_norm(d)
            d.mul_(torch.clamp(self.epsilon / norm.clamp_min(1e-30), max=1.0))
            p.copy_(t + d)
        self._loss_and_grad(x, y)
      with torch.no_grad():
        for p, t in zip(self.params, theta, strict=True):
          p.copy_(t)
        for b, saved in zip(self.model.buffers(), buffers, strict=True):
          b.copy_(saved)
    self.optimizer.step()
    return loss.detach()
