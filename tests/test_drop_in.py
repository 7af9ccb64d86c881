"""drop_in_amp: AMP in a train step that is not changed, against amp() and a float64 reference."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

# Float64 runs in a subprocess so that jax_enable_x64 does not leak into other tests.
FLOAT64_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, optax
    import amp_optax

    def loss_fn(p, x):
      h = jnp.tanh(x @ p["w1"] + p["b1"])
      return jnp.mean((h @ p["w2"] - 1.0) ** 2)

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6)) * 0.7),
              "b1": jnp.asarray(rng.normal(size=(6,)) * 0.1),
              "w2": jnp.asarray(rng.normal(size=(6, 2)) * 0.7)}
    batches = [jnp.asarray(rng.normal(size=(8, 4))) for _ in range(4)]
    out = {}
    for k in (1, 2, 3):
      for norm in ("per_tensor", "global"):
        for relative in (False, True):
          eps = 0.2 if relative else 0.3
          # A schedule with exact binary values: optax computes schedules in float32, where
          # eager and compiled evaluation may round differently (0.08750001 vs 0.0875).
          base = lambda: optax.chain(optax.add_decayed_weights(1e-2),
                                     optax.sgd(optax.piecewise_constant_schedule(0.125, {2: 0.5}),
                                               momentum=0.9, nesterov=True))
          hp = dict(inner_lr=0.7, inner_steps=k, norm=norm, relative=relative)
          ref_tx = optax.chain(amp_optax.amp(eps, **hp), base())
          tx = amp_optax.drop_in_amp(base(), eps, **hp)
          @jax.jit
          def ref_step(p, s, x, ref_tx=ref_tx):
            g = jax.grad(loss_fn)(p, x)
            u, s = ref_tx.update(g, s, p, grad_fn=lambda q, _: jax.grad(loss_fn)(q, x))
            return optax.apply_updates(p, u), s

          @jax.jit
          def plain_step(p, s, x, tx=tx):  # the unchanged step
            u, s = tx.update(jax.grad(loss_fn)(p, x), s, p)
            return optax.apply_updates(p, u), s

          p_ref, s_ref, p, s = params, ref_tx.init(params), params, tx.init(params)
          for x in batches:
            p_ref, s_ref = ref_step(p_ref, s_ref, x)
            for _ in range(k + 1):  # fed the same batch K + 1 times
              p, s = plain_step(p, s, x)
          diff = max(float(jnp.max(jnp.abs(a - b)))
                     for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)))
          out[f"{k}-{norm}-relative={relative}"] = [diff, int(s.count), int(s.phase)]
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_fed_one_batch_k_plus_1_times_equals_amp_in_float64():
  out = subprocess.run([sys.executable, "-c", FLOAT64_SCRIPT], capture_output=True, text=True,
                       timeout=600, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  import json
  results = json.loads(out.stdout.split("RESULT")[-1])
  assert len(results) == 12
  for name, (diff, count, phase) in results.items():
    assert diff < 1e-10, (name, diff)
    assert count == 4 and phase == 0, name  # 4 descent steps; back at theta


def loss_fn(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] - 1.0) ** 2)


def make_problem():
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(4, 6)) * 0.7, jnp.float32),
            "b1": jnp.zeros((6,), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(6, 2)) * 0.7, jnp.float32)}
  batches = [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(6)]
  return params, batches


def plain_step(tx):
  @jax.jit
  def step(params, opt_state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def test_base_state_and_schedules_advance_on_descent_calls_only():
  params, batches = make_problem()
  tx = amp_optax.drop_in_amp(optax.sgd(optax.linear_schedule(0.1, 0.0, 3)), 0.05,
                             inner_steps=2)
  state = tx.init(params)
  step = plain_step(tx)
  for t in range(6):
    params, state = step(params, state, batches[t])
    assert int(state.count) == (t + 1) // 3
    assert int(state.phase) == (t + 1) % 3


def test_unperturbed_params_at_every_point_of_the_cycle():
  params, batches = make_problem()
  tx = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, inner_steps=2)
  state = tx.init(params)
  step = plain_step(tx)
  theta = params
  for t in range(6):
    params, state = step(params, state, batches[t])
    got = amp_optax.unperturbed_params(params, state)
    if int(state.phase) == 0:  # a descent call just ran: theta moved
      theta = params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(theta)):
      np.testing.assert_allclose(a, b, atol=1e-6)
    moved = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theta)))
    assert (moved > 1e-3) == (int(state.phase) > 0)  # perturbed between descent calls
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  with pytest.raises(ValueError, match=r"^unperturbed_params\(\): .*exactly one "
                     r"amp_optax.drop_in_amp \(a DropInAmpState\).*found 2"):
    amp_optax.unperturbed_params(params, (chained.init(params), chained.init(params)))


def test_epsilon_zero_is_the_base_optimiser_every_k_plus_1_calls():
  params, batches = make_problem()
  tx = amp_optax.drop_in_amp(optax.adam(1e-2), 0.0, inner_steps=1)
  base = optax.adam(1e-2)
  p, s = params, tx.init(params)
  q, r = params, base.init(params)
  step, base_step = plain_step(tx), plain_step(base)
  for x in batches:
    p, s = step(p, s, x)  # ascent call: Delta = 0
    p, s = step(p, s, x)  # descent call
    q, r = base_step(q, r, x)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def numpy_grad(p, x):
  """The gradient of loss_fn by hand, in float64."""
  h = np.tanh(x @ p["w1"] + p["b1"])
  residual = h @ p["w2"] - 1.0
  d_out = 2.0 * residual / residual.size
  d_pre = (d_out @ p["w2"].T) * (1.0 - h ** 2)
  return {"w1": x.T @ d_pre, "b1": d_pre.sum(0), "w2": h.T @ d_out}


def momentum_reference(params, batches, eps, lr, beta, base_lr, norm):
  """Momentum ascent from the algorithm, in float64 NumPy, with SGD as the base optimiser."""
  theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
  avg = {k: np.zeros_like(v) for k, v in theta.items()}
  delta = {k: np.zeros_like(v) for k, v in theta.items()}
  for x in batches:
    g = numpy_grad({k: theta[k] + delta[k] for k in theta}, np.asarray(x, np.float64))
    theta = {k: theta[k] - base_lr * g[k] for k in theta}
    avg = {k: beta * avg[k] + (1 - beta) * g[k] for k in theta}
    step = {k: -lr * avg[k] for k in theta}
    if norm == "per_tensor":
      delta = {k: v * min(1.0, eps / max(np.linalg.norm(v), 1e-300)) for k, v in step.items()}
    else:
      total = np.sqrt(sum(np.sum(v ** 2) for v in step.values()))
      delta = {k: v * min(1.0, eps / max(total, 1e-300)) for k, v in step.items()}
  return {k: theta[k] + delta[k] for k in theta}, theta


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_momentum_ascent_against_float64_reference(norm):
  params, batches = make_problem()
  tx = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, inner_lr=3.0, norm=norm,
                             ascent="momentum", momentum=0.8)
  state = tx.init(params)
  step = plain_step(tx)
  p = params
  for x in batches:
    p, state = step(p, state, x)
  want_perturbed, want_theta = momentum_reference(params, batches, 0.05, 3.0, 0.8, 0.1, norm)
  for k in params:
    np.testing.assert_allclose(p[k], want_perturbed[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(amp_optax.unperturbed_params(p, state)[k], want_theta[k],
                               rtol=2e-5, atol=2e-6)
  assert int(state.count) == len(batches)  # one gradient, one descent step per call
  assert float(state.delta_norm) > 0


def test_errors_say_what_to_change():
  with pytest.raises(ValueError, match=r"^drop_in_amp\(\): `ascent` must be one of"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, ascent="nesterov")
  with pytest.raises(ValueError, match=r"^drop_in_amp\(\): .*inner_steps=1"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, inner_steps=2, ascent="momentum")
  with pytest.raises(ValueError, match=r"^drop_in_amp\(\): `epsilon` must be >= 0"):
    amp_optax.drop_in_amp(optax.sgd(0.1), -0.05)
  with pytest.raises(ValueError, match=r"^drop_in_amp\(\): `momentum` must be in \[0, 1\)"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, ascent="momentum", momentum=1.5)
  with pytest.raises(TypeError, match=r"^drop_in_amp\(\): `relative` must be True or False"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, relative="relative")
  # 0.1's radius= is gone, and everything after epsilon is keyword-only.
  with pytest.raises(TypeError, match="radius"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, radius="relative")
  with pytest.raises(TypeError, match="positional"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, 0.7)


@pytest.mark.slow
def test_grad_fn_is_passed_to_the_base_and_ignored():
  """A SAM-notebook step that always passes grad_fn switches by its optimiser line only."""
  params, batches = make_problem()
  tx = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05)
  s1 = s2 = tx.init(params)
  p1 = p2 = params
  for x in batches[:4]:
    g1 = jax.grad(loss_fn)(p1, x)
    u1, s1 = tx.update(g1, s1, p1, grad_fn=lambda q, _, x=x: jax.grad(loss_fn)(q, x))
    p1 = optax.apply_updates(p1, u1)
    g2 = jax.grad(loss_fn)(p2, x)
    u2, s2 = tx.update(g2, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_learns_and_traces_once():
  params, batches = make_problem()
  traces = []
  for ascent in ("gradient", "momentum"):
    tx = amp_optax.drop_in_amp(optax.sgd(0.1, momentum=0.9), 0.05, ascent=ascent)

    @jax.jit
    def step(params, opt_state, x, tx=tx):
      traces.append(1)
      grads = jax.grad(loss_fn)(params, x)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    p, s = params, tx.init(params)
    x = batches[0]
    before = float(loss_fn(params, x))
    for _ in range(60):
      p, s = step(p, s, x)
    after = float(loss_fn(amp_optax.unperturbed_params(p, s), x))
    assert after < 0.5 * before, (ascent, before, after)
  assert len(traces) == 2  # once per optimiser
