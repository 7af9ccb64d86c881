"""A drop_in_amp run checkpointed with Orbax at every phase of its cycle and resumed in a fresh
process continues bitwise as the uninterrupted run (parameters as held, with opt_state)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ocp = pytest.importorskip("orbax.checkpoint")

CALLS = 9  # three AMP steps of K = 2: phases 0, 1, 2, 0, ...

# The run, as a module both processes import: successive batches, a momentum base.
RUN = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    import amp_optax

    def batch(i):
      x = jnp.asarray(np.random.default_rng(i).normal(size=(8, 3)), jnp.float32)
      return x, jnp.sin(x @ jnp.array([1.0, -2.0, 0.5]))

    def loss_fn(params, b):
      return jnp.mean((jnp.tanh(b[0] @ params["w"]) + params["b"] - b[1]) ** 2)

    tx = amp_optax.drop_in_amp(optax.adam(1e-2), 0.05, inner_steps=2)

    def init():
      params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}
      return params, tx.init(params)

    @jax.jit
    def step(params, opt_state, b):
      updates, opt_state = tx.update(jax.grad(loss_fn)(params, b), opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    def run(params, opt_state, start, stop):
      for i in range(start, stop):
        params, opt_state = step(params, opt_state, batch(i))
      return params, opt_state
''')

RESUME = textwrap.dedent('''
    import sys, jax, numpy as np, orbax.checkpoint as ocp
    import drop_in_run as r
    root, calls = sys.argv[1], int(sys.argv[2])
    for saved_at in map(int, sys.argv[3:]):
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, r.init())
      params, opt_state = ocp.StandardCheckpointer().restore(f"{root}/at{saved_at}", abstract)
      params, _ = r.run(params, opt_state, saved_at, calls)
      np.savez(f"{root}/final{saved_at}.npz", **{k: np.asarray(v) for k, v in params.items()})
''')


def test_orbax_checkpoint_at_every_phase_resumes_bitwise_in_a_fresh_process(tmp_path):
  (tmp_path / "drop_in_run.py").write_text(RUN)
  sys.path.insert(0, str(tmp_path))
  try:
    import drop_in_run as r
    params, opt_state = r.init()
    want, _ = r.run(params, opt_state, 0, CALLS)
    checkpointer = ocp.StandardCheckpointer()
    saved = [1, 2, 3, 4]  # phases 1, 2, 0, 1
    for at in saved:
      state = r.run(params, opt_state, 0, at)
      checkpointer.save(tmp_path / f"at{at}", state)
    checkpointer.wait_until_finished()
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop("drop_in_run", None)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path), str(pathlib.Path(__file__).resolve().parents[1])]))
  (tmp_path / "resume.py").write_text(RESUME)
  subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(tmp_path), str(CALLS),
                  *map(str, saved)], check=True, env=env, timeout=600)
  for at in saved:
    got = np.load(tmp_path / f"final{at}.npz")
    for k in want:
      np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=f"saved at call {at}")
