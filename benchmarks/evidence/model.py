"""The MLP: plain JAX (a dict of layers), ReLU, He-normal initialisation, optional BatchNorm.

With BatchNorm every hidden layer is ``x @ w``, normalised, then ``scale`` and ``bias``; in
training it normalises with the batch's own mean and biased variance and returns them, so that
the caller decides how they become running statistics (``train.POLICIES``).
"""

from typing import Any

import jax
import jax.numpy as jnp

BN_EPS = 1e-5
Stats = list[dict[str, jax.Array]]  # per BatchNorm layer: {"mean", "var"}


def init(key: jax.Array, sizes: tuple[int, ...], batchnorm: bool = False) -> dict[str, Any]:
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    layer = {"w": jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2 / fan_in)}
    if batchnorm and i < len(sizes) - 2:
      layer |= {"scale": jnp.ones((fan_out,)), "bias": jnp.zeros((fan_out,))}
    else:
      layer["b"] = jnp.zeros((fan_out,))
    params[f"layer{i}"] = layer
  return params


def init_stats(params: dict[str, Any]) -> Stats:
  """Running statistics (mean 0, variance 1) for each BatchNorm layer; ``[]`` without any."""
  return [{"mean": jnp.zeros_like(layer["scale"]), "var": jnp.ones_like(layer["scale"])}
          for layer in (params[f"layer{i}"] for i in range(len(params))) if "scale" in layer]


def apply(params: dict[str, Any], x: jax.Array,
          running: Stats | None = None) -> tuple[jax.Array, Stats]:
  """``(logits, batch_stats)``. BatchNorm layers normalise with ``running`` when it is given
  (evaluation), else with the batch's mean and biased variance, returned as ``batch_stats``."""
  n, batch_stats, k = len(params), [], 0
  for i in range(n):
    layer = params[f"layer{i}"]
    x = x @ layer["w"]
    if "scale" in layer:
      if running is None:
        mean, var = jnp.mean(x, 0), jnp.var(x, 0)
        batch_stats.append({"mean": mean, "var": var})
      else:
        mean, var = running[k]["mean"], running[k]["var"]
      k += 1
      x = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * layer["scale"] + layer["bias"]
    else:
      x = x + layer["b"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x, batch_stats
