"""Smoke test of the installed wheel, run by .ci/run from outside the checkout.

    python -I .ci/wheel_smoke.py CHECKOUT   # -I: no script folder, PYTHONPATH or user site

Checks that ``amp_optax`` is imported from this venv's site-packages (not from CHECKOUT), that
one AMP step with a ``grad_fn`` runs, that ``import amp_optax`` leaves Flax alone and the Flax
extra's helpers import, and that the installed distribution has ``py.typed``, the LICENSE and
its licence metadata.
"""

import importlib.metadata
import importlib.resources
import os
import sys
import sysconfig


def fail(message: str) -> None:
  raise SystemExit(f"wheel smoke test: {message}")


def main(checkout: str) -> None:
  checkout = os.path.realpath(checkout)
  if os.path.realpath(os.getcwd()).startswith(checkout + os.sep):
    fail(f"run it from outside the checkout, not from {os.getcwd()}")

  import amp_optax

  where = os.path.realpath(os.path.dirname(amp_optax.__file__))
  site_packages = os.path.realpath(sysconfig.get_paths()["purelib"])
  if not where.startswith(site_packages + os.sep) or where.startswith(checkout + os.sep):
    fail(f"amp_optax was imported from {where}, not from {site_packages}")
  if "flax" in sys.modules:
    fail("import amp_optax imported flax: the core transform must not need it")

  # One AMP step with a grad_fn.
  import jax
  import jax.numpy as jnp
  import optax

  def loss_fn(params, x):
    return jnp.mean((x @ params["w"] - 1.0) ** 2)

  params, x = {"w": jnp.zeros(4)}, jnp.ones((8, 4))
  tx = optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1))
  opt_state = tx.init(params)
  amp_grad_fn = jax.grad(lambda p, _: loss_fn(p, x))
  updates, opt_state = tx.update(jax.grad(loss_fn)(params, x), opt_state, params,
                                 grad_fn=amp_grad_fn)
  new_params = optax.apply_updates(params, updates)
  if not (float(loss_fn(new_params, x)) < float(loss_fn(params, x))):
    fail("one AMP step did not lower the loss")
  if abs(float(opt_state[0].delta_norm) - 0.05) > 1e-6:
    fail(f"|Delta| = {float(opt_state[0].delta_norm)}, expected epsilon = 0.05")

  # The Flax extra.
  from amp_optax import flax_linen
  from amp_optax import flax_nnx

  for module in (flax_linen, flax_nnx):
    if not os.path.realpath(module.__file__).startswith(site_packages + os.sep):
      fail(f"{module.__name__} was imported from {module.__file__}")

  # What ships: py.typed (PEP 561), the licence file and the licence metadata.
  if not importlib.resources.files("amp_optax").joinpath("py.typed").is_file():
    fail("amp_optax/py.typed is not installed")
  dist = importlib.metadata.distribution("amp_optax")
  files = [str(f) for f in dist.files or []]
  licenses = [f for f in files if f.endswith("LICENSE") and ".dist-info" in f]
  if not licenses:
    fail(f"no LICENSE in the installed distribution's files: {files}")
  text = dist.locate_file(licenses[0]).read_text(encoding="utf-8")
  if "Apache License" not in text or "Version 2.0" not in text:
    fail(f"{licenses[0]} is not the Apache-2.0 text")
  if dist.metadata.get("License-Expression") != "Apache-2.0":
    fail(f"License-Expression is {dist.metadata.get('License-Expression')!r}")
  if "LICENSE" not in (dist.metadata.get_all("License-File") or []):
    fail("the metadata names no License-File: LICENSE")
  if dist.version != amp_optax.__version__:
    fail(f"dist version {dist.version} != amp_optax.__version__ {amp_optax.__version__}")

  print(f"wheel smoke test passed: amp_optax {dist.version} from {where}, jax {jax.__version__},"
        f" optax {optax.__version__}, flax {importlib.metadata.version('flax')}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  main(sys.argv[1])
