"""The MLP: plain JAX (a dict of layers), ReLU, He-normal initialisation."""

import jax
import jax.numpy as jnp


def init(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, dict[str, jax.Array]]:
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {"w": jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2 / fan_in),
                           "b": jnp.zeros((fan_out,))}
  return params


def apply(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  n = len(params)
  for i in range(n):
    x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x
