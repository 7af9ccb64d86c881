"""The compiled AMP step: no host callback, cacheable across processes, exportable, lean.

A host callback in the step is a device-to-host round-trip on every step, keeps the step out
of JAX's persistent compilation cache and makes ``jax.export`` fail; none of amp's
configurations may hold one (a traced negative epsilon is caught on the device instead: NaN
updates).
"""

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - 1.0) ** 2)


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (5, 8)) * 0.5, "b1": jnp.zeros((8,)),
          "w2": jax.random.normal(k2, (8, 2)) * 0.5}


X = jnp.linspace(-1.0, 1.0, 20).reshape(4, 5)


def make_step(tx, ascend=None):
  extra = {} if ascend is None else {"ascend": ascend}

  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params, X)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p, _: jax.grad(loss_fn)(p, X), **extra)
    return optax.apply_updates(params, updates), opt_state

  return step


def host_calls(step, params, opt_state):
  text = jax.jit(step).lower(params, opt_state).as_text()
  return [line for line in text.splitlines() if "callback" in line]


SCHEDULE = optax.linear_schedule(0.05, 0.01, 100)
LR_SCHEDULE = optax.cosine_decay_schedule(1.0, 100)


def configurations():
  """(name, tx, ascend) for every argument that changes what the step computes."""
  out = []
  for eps, lr, k, norm, relative in itertools.product(
      [0.05, SCHEDULE], [1.0, LR_SCHEDULE], [0, 1, 2], ["per_tensor", "global"],
      [False, True]):
    name = (f"eps={'sched' if callable(eps) else eps}-lr={'sched' if callable(lr) else lr}"
            f"-K={k}-{norm}-relative={relative}")
    out.append((name, amp_optax.amp(eps, inner_lr=lr, inner_steps=k, norm=norm,
                                    relative=relative), None))
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  out.append(("mask", amp_optax.amp(SCHEDULE, mask=mask), None))
  for reuse in (False, True):
    for ascend in (True, False):
      out.append((f"ascend={ascend}-reuse_correction={reuse}",
                  amp_optax.amp(SCHEDULE, reuse_correction=reuse), ascend))
  injected = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps",))
  for k in (1, 2):
    out.append((f"inject_hyperparams-K={k}", injected(epsilon=0.05, inner_steps=k), None))
  return out


@pytest.mark.parametrize("name,amp_tx,ascend", configurations(),
                         ids=[c[0] for c in configurations()])
def test_no_host_callback_in_the_compiled_step(name, amp_tx, ascend):
  tx = optax.chain(amp_tx, optax.sgd(0.1, momentum=0.9))
  params = make_params()
  assert host_calls(make_step(tx, ascend), params, tx.init(params)) == [], name


def test_a_host_callback_shows_in_the_lowered_text():
  """Guards the test above: a host callback in the step (here in grad_fn) is found."""
  tx = optax.chain(amp_optax.amp(SCHEDULE), optax.sgd(0.1))
  params = make_params()

  def step(params, opt_state):
    def grad_fn(p, _):
      jax.debug.callback(lambda: None)
      return jax.grad(loss_fn)(p, X)

    updates, opt_state = tx.update(jax.grad(loss_fn)(params, X), opt_state, params,
                                   grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  assert host_calls(step, params, tx.init(params))


@pytest.mark.parametrize("k", [1, 2])
def test_no_host_callback_in_the_compiled_grouped_step(k):
  tx = optax.chain(amp_optax.grouped_amp(SCHEDULE, num_groups=2, inner_steps=k),
                   optax.sgd(0.1, momentum=0.9))
  params = make_params()

  def step(params, opt_state):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
        params, amp_optax.group_batch(X, 2))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), opt_state

  assert host_calls(step, params, tx.init(params)) == []


def test_export_round_trip_of_a_step_with_an_epsilon_schedule():
  pytest.importorskip("flatbuffers")
  tx = optax.chain(amp_optax.amp(SCHEDULE, inner_steps=2), optax.sgd(0.1, momentum=0.9))
  params = make_params()
  carry = (params, tx.init(params))
  leaves, treedef = jax.tree.flatten(carry)

  # Exported over the flat leaves: jax.export serialises only registered pytree types, and
  # optax's states (like AmpState) are NamedTuples it does not know.
  @jax.jit
  def flat_step(*leaves):
    return jax.tree.leaves(make_step(tx)(*jax.tree.unflatten(treedef, leaves)))

  blob = jax.export.export(flat_step)(*leaves).serialize()
  restored = jax.export.deserialize(blob)
  for _ in range(3):  # several steps, so the schedule's value changes
    want = flat_step(*leaves)
    got = restored.call(*leaves)
    for w, g in zip(want, got):
      np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
    leaves = want
  assert int(jax.tree.unflatten(treedef, leaves)[1][0].count) == 3


CACHE_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    sys.path.insert(0, sys.argv[2])
    from tests import test_compiled_step as t
    import optax
    import amp_optax
    tx = optax.chain(amp_optax.amp(t.SCHEDULE, inner_steps=2), optax.sgd(0.1, momentum=0.9))
    params = t.make_params()
    jax.block_until_ready(jax.jit(t.make_step(tx))(params, tx.init(params)))
    print("HITS", sum("cache_hits" in e for e in events))
""")


@pytest.mark.slow
def test_persistent_compilation_cache_hit_in_a_second_process(tmp_path):
  cache = tmp_path / "cache"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run():
    out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(cache), ROOT], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split("HITS")[-1].strip())

  assert run() == 0
  assert any(cache.iterdir()), "the first process wrote no cache entry"
  assert run() >= 1  # the step (and the init's programs) come from the cache


def mlp_params(width=256, depth=4):
  keys = jax.random.split(jax.random.key(1), depth)
  return [{"w": jax.random.normal(k, (width, width)) / 16, "b": jnp.zeros((width,))}
          for k in keys]


def mlp_loss(params, x):
  h = x
  for layer in params:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return jnp.mean(h ** 2)


def extra_temp_memory(tx, base_temp=None):
  params = mlp_params()
  x = jnp.ones((4, 256))

  def step(params, opt_state):
    grads = jax.grad(mlp_loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p, _: jax.grad(mlp_loss)(p, x))
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("memory_analysis() not available on this backend")
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  return stats.temp_size_in_bytes / param_bytes


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_amp_k1_extra_memory_is_no_more_than_sams(norm):
  """Pins AMP K=1's temporary memory over ERM to SAM's + 0.05 parameter copies (was +0.25/+1.0)."""
  base = lambda: optax.chain(optax.add_decayed_weights(5e-4),
                             optax.sgd(0.1, momentum=0.9, nesterov=True))
  erm = extra_temp_memory(base())
  amp_extra = extra_temp_memory(optax.chain(amp_optax.amp(0.05, norm=norm), base())) - erm
  sam = optax.contrib.sam(base(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                          sync_period=2, opaque_mode=True)
  sam_extra = extra_temp_memory(sam) - erm
  assert amp_extra <= sam_extra + 0.05, (amp_extra, sam_extra)
