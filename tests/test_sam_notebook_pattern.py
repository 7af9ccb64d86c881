"""A train step written for ``optax.contrib.sam`` runs with ``amp`` (issue 15, item 8).

Optax's SAM notebook (``examples/contrib/sam.ipynb`` in google-deepmind/optax) trains on a 2-D
loss with a sharp minimum at (0, 0) and a flat one at (2, 0), from (-0.4, -0.4), with three
outer optimisers (sgd, sgd with momentum, adam) and two adversaries: ``normalize()`` then
``sgd(rho)`` (``sync_period=2``) and ``normalize()`` then ``adam(rho)`` (``sync_period=5``).
Written here in our own code, in the notebook's shape:

* the step function: always passing ``grad_fn`` runs SAM (opaque mode), AMP and plain Optax
  optimisers; the notebook's ``isinstance(state, SAMState)`` step (and its default-mode step,
  without ``grad_fn``) makes ``amp`` raise its missing-``grad_fn`` error;
* which transforms accept and ignore ``grad_fn`` (aliases, ``chain``, SAM's default mode) and
  which raise (a bare ``GradientTransformation``);
* the rho -> epsilon mapping of docs/guides/amp_vs_sam.md: exact for ``normalize()+sgd(rho)``
  with ``sync_period=2``; on the notebook's loss, for each adversary, the mapped AMP ends in the
  minimum SAM ends in, where the naive ``epsilon=rho`` does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import pytest

import amp_optax

BIG = 1e6  # an inner_lr with inner_lr * ||g|| >= epsilon: every ascent step reaches the sphere.
START = (-0.4, -0.4)  # the notebook's start point
STEPS = 4000  # the notebook's number of opaque-mode steps


def two_minima(params):
  """Sharp minimum at (0, 0) (width 0.1 along y), flat one at (2, 0) (width 1)."""
  x, y = params[0], params[1]
  flat = jnp.exp(-((x - 2.0) ** 2 + y**2))
  sharp = jnp.exp(-(x**2 + 100.0 * y**2))
  return -(flat + sharp)


amp_grad_fn = jax.grad(lambda p, _: two_minima(p))


def basin(params):
  """Where a run ended: 'flat' near (2, 0), 'sharp' near (0, 0), else 'between'."""
  p = np.asarray(params, np.float64)
  if np.linalg.norm(p - [2.0, 0.0]) < 0.1:
    return "flat"
  if np.linalg.norm(p) < 0.25:
    return "sharp"
  return f"between ({p})"


# ------------------------------------------------------------------ the notebook's step shapes


def step_always_grad_fn(tx):
  """The opaque-mode step, written to pass grad_fn whatever the optimiser is."""

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(two_minima)(params)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def step_grad_fn_if_sam_state(tx):
  """The notebook's opaque-mode step: grad_fn only when the state is a SAMState."""

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(two_minima)(params)
    if isinstance(opt_state, contrib.SAMState):
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def step_without_grad_fn(tx):
  """The notebook's default-mode (transparent) step: no grad_fn."""

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(two_minima)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(tx, steps=STEPS, start=START, make_step=step_always_grad_fn):
  step = make_step(tx)

  @jax.jit
  def loop(params):
    def body(carry, _):
      params, opt_state, loss = step(*carry)
      return (params, opt_state), loss

    (params, opt_state), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params, opt_state

  return loop(jnp.asarray(start))


def sam(outer, adversary, sync_period):
  return contrib.sam(outer, adversary, sync_period=sync_period, opaque_mode=True)


def sgd_adversary(rho):
  return optax.chain(contrib.normalize(), optax.sgd(rho))


def adam_adversary(rho):
  return optax.chain(contrib.normalize(), optax.adam(rho))


def mapped_amp(outer, epsilon, inner_steps, inner_lr=BIG, norm="global"):
  return optax.chain(
      amp_optax.amp(epsilon, inner_lr=inner_lr, inner_steps=inner_steps, norm=norm), outer)


# ------------------------------------------------------------------ the step function


def test_a_step_that_always_passes_grad_fn_runs_sam_amp_and_plain_optimisers():
  ends = {}
  for name, tx in {
      "sam": sam(optax.sgd(0.01), sgd_adversary(0.1), 2),
      "amp": mapped_amp(optax.sgd(0.01), 0.1, 1),
      "sgd": optax.sgd(0.01),
      "adam": optax.adam(1e-3),
      "sam default mode": contrib.sam(optax.sgd(0.01), sgd_adversary(0.1), sync_period=2),
  }.items():
    params, state = train(tx, steps=3)
    ends[name] = np.asarray(params)
    assert np.all(np.isfinite(ends[name])) and not np.allclose(ends[name], START), name
  # Only the optimiser line changed between SAM and AMP, and with the mapping they agree.
  np.testing.assert_allclose(ends["amp"], ends["sam"], rtol=1e-5)
  assert not np.allclose(ends["amp"], ends["sgd"], rtol=1e-5)
  _, state = train(mapped_amp(optax.sgd(0.01), 0.1, 1), steps=1)
  assert isinstance(state[0], amp_optax.AmpState)
  assert abs(float(state[0].delta_norm) - 0.1) < 1e-6  # the ball's edge, as SAM's rho step


IGNORING = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "chain(clip, adam)": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "inject_hyperparams(adam)": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "sam default mode": lambda: contrib.sam(optax.sgd(0.1), sgd_adversary(0.05)),
    "with_extra_args_support(scale_by_adam())":
        lambda: optax.with_extra_args_support(optax.scale_by_adam()),
}


def _never_called(params, inner_step):
  raise AssertionError("grad_fn was called")


@pytest.mark.parametrize("name", list(IGNORING))
def test_plain_optax_transforms_accept_and_ignore_grad_fn(name):
  tx = IGNORING[name]()
  params = {"w": jnp.array([0.3, -0.2]), "b": jnp.array(0.5)}
  grads = {"w": jnp.array([0.1, 0.4]), "b": jnp.array(-0.2)}
  state = tx.init(params)
  for _ in range(2):  # SAM's default mode: an adversarial call, then an outer one.
    want, want_state = tx.update(grads, state, params)
    got, got_state = tx.update(grads, state, params, grad_fn=_never_called)
    for a, b in zip(jax.tree.leaves((want, want_state)), jax.tree.leaves((got, got_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(got))
    params, state = optax.apply_updates(params, got), got_state


@pytest.mark.parametrize("make", [optax.identity, optax.scale_by_adam, lambda: optax.trace(0.9)],
                         ids=["identity", "scale_by_adam", "trace"])
def test_a_bare_gradient_transformation_rejects_grad_fn(make):
  """Not every Optax transform ignores grad_fn: one outside chain() or an alias raises."""
  tx = make()
  assert not isinstance(tx, optax.GradientTransformationExtraArgs)
  params = jnp.array([1.0, 2.0])
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(params, tx.init(params), params, grad_fn=_never_called)
  chained = optax.chain(make())
  chained.update(params, chained.init(params), params, grad_fn=_never_called)


@pytest.mark.parametrize("make_step", [step_grad_fn_if_sam_state, step_without_grad_fn],
                         ids=["grad_fn only for SAMState", "default mode, no grad_fn"])
def test_the_notebook_steps_without_grad_fn_make_amp_raise(make_step):
  # For SAM (opaque mode) the isinstance step works: its state is a SAMState.
  if make_step is step_grad_fn_if_sam_state:
    params, _ = train(sam(optax.sgd(0.01), sgd_adversary(0.1), 2), steps=2, make_step=make_step)
    assert not np.allclose(params, START)
  # For amp the state is the chain's tuple: the step calls update without grad_fn, and amp says
  # so instead of returning the clean gradient.
  with pytest.raises(ValueError, match=r"amp\(\): update\(\) needs `grad_fn`"):
    train(mapped_amp(optax.sgd(0.01), 0.1, 1), steps=2, make_step=make_step)


# ------------------------------------------------------------------ exactness in float64


def _x64():
  if callable(getattr(jax, "enable_x64", None)):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # JAX < 0.7.

  return enable_x64()


def _small_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)))
  y = jnp.asarray(rng.normal(size=(8,)))
  params = {"w": jnp.asarray(rng.normal(size=(3,))), "b": jnp.asarray(0.3)}

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w"]) + p["b"] - y) ** 2)

  return params, loss_fn


def _run_tree(tx, params, loss_fn, calls):
  grad_fn = jax.grad(lambda p, _: loss_fn(p))
  state = tx.init(params)
  for _ in range(calls):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  return params


OUTERS = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
}


@pytest.mark.parametrize("outer", list(OUTERS))
def test_sgd_adversary_with_sync_period_2_is_amp_global_k1(outer):
  """SAM(outer, normalize()+sgd(rho), sync_period=2) == chain(amp(rho, global, K=1), outer)."""
  rho = 0.05
  with _x64():
    params, loss_fn = _small_problem()
    assert params["w"].dtype == jnp.float64
    want = _run_tree(sam(OUTERS[outer](), sgd_adversary(rho), 2), params, loss_fn, 5)
    got = _run_tree(mapped_amp(OUTERS[outer](), rho, 1), params, loss_fn, 5)
    per_tensor = _run_tree(mapped_amp(OUTERS[outer](), rho, 1, norm="per_tensor"), params,
                           loss_fn, 5)
    short = _run_tree(mapped_amp(OUTERS[outer](), rho, 1, inner_lr=0.01), params, loss_fn, 5)
    erm = _run_tree(OUTERS[outer](), params, loss_fn, 5)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)
  # The match depends on the global ball and on steps that reach its edge, and the perturbation
  # mattered.
  diff = lambda a, b: max(float(np.max(np.abs(a[k] - b[k]))) for k in params)
  assert min(diff(per_tensor, want), diff(short, want), diff(erm, want)) > 1e-6


def test_sam_default_mode_takes_sync_period_calls_per_amp_step():
  """Default (transparent) mode: s calls of SAM's update are one AMP step."""
  rho, steps = 0.05, 4
  with _x64():
    params, loss_fn = _small_problem()
    transparent = contrib.sam(optax.sgd(0.1, momentum=0.9), sgd_adversary(rho), sync_period=2)
    want = _run_tree(transparent, params, loss_fn, 2 * steps)
    got = _run_tree(mapped_amp(optax.sgd(0.1, momentum=0.9), rho, 1), params, loss_fn, steps)
    half = _run_tree(transparent, params, loss_fn, steps)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)
  assert max(float(np.max(np.abs(half[k] - want[k]))) for k in params) > 1e-4


# ------------------------------------------------------------------ the notebook's loss


def test_without_a_perturbation_the_notebook_optimisers_end_in_the_sharp_minimum():
  for tx in (optax.sgd(0.01), optax.sgd(0.01, momentum=0.9), optax.adam(1e-3)):
    assert basin(train(tx)[0]) == "sharp"


@pytest.mark.parametrize(
    "outer, rho, sync_period",
    [("sgd", 0.1, 2),  # the notebook's drop-in SAM
     ("sgd momentum", 0.1, 2),  # the notebook's SAM with momentum
     ("sgd", 0.05, 3)],  # s - 1 = 2 normalised steps: the naive epsilon = rho is too small
    ids=["sgd-rho0.1-s2", "momentum-rho0.1-s2", "sgd-rho0.05-s3"])
def test_sgd_adversary_mapping_on_the_notebook_loss(outer, rho, sync_period):
  make = {"sgd": lambda: optax.sgd(0.01), "sgd momentum": lambda: optax.sgd(0.01, momentum=0.9)}
  make = make[outer]
  k = sync_period - 1
  assert basin(train(sam(make(), sgd_adversary(rho), sync_period))[0]) == "flat"
  assert basin(train(mapped_amp(make(), k * rho, k))[0]) == "flat"
  if sync_period > 2:
    assert basin(train(mapped_amp(make(), rho, k))[0]) == "sharp"


def test_adam_adversary_is_a_sign_step_of_rho_per_coordinate():
  """normalize()+adam(rho): each coordinate moves by about rho per step, whatever its gradient."""
  rho, sync_period = 0.03, 5
  adversary = adam_adversary(rho)
  params = jnp.array([0.05, 1e-8])  # next to the sharp minimum: the y gradient is tiny
  g = amp_grad_fn(params, 0)
  assert abs(float(g[1])) < 1e-3 * abs(float(g[0]))
  state, delta = adversary.init(params), jnp.zeros(2)
  for i in range(sync_period - 1):
    updates, state = adversary.update(g, state, params + delta)
    delta = delta - updates
    if i == 0:  # the first adam step is rho * sign(g)
      np.testing.assert_allclose(delta, rho * np.sign(g), rtol=1e-4)
    g = amp_grad_fn(params + delta, i)
  # After s - 1 steps the sharp direction (y) is perturbed by about (s - 1) * rho = 0.12 (here
  # 0.105: the later adam steps are a little shorter), more than the sharp minimum's width (0.1);
  # a normalised gradient step of that length is not.
  assert abs(float(delta[1])) > max(0.85 * (sync_period - 1) * rho, 0.1)
  clean = amp_grad_fn(params, 0)
  along_gradient = (sync_period - 1) * rho * clean / jnp.linalg.norm(clean)
  assert abs(float(along_gradient[1])) < 1e-3


@pytest.mark.slow
def test_adam_adversary_mapping_on_the_notebook_loss():
  """The notebook's SAM Adam: adam(1e-3) outer, normalize()+adam(0.03), sync_period=5."""
  rho, outer = 0.03, lambda: optax.adam(1e-3)
  assert basin(train(sam(outer(), adam_adversary(rho), 5))[0]) == "flat"
  # Mapped: epsilon = (s - 1) * rho, global, K = s - 1, inner_lr large.
  assert basin(train(mapped_amp(outer(), 4 * rho, 4))[0]) == "flat"
  # The naive epsilon = rho, K = 4 (the report): stays in the sharp minimum, whatever inner_lr.
  assert basin(train(mapped_amp(outer(), rho, 4))[0]) == "sharp"
  assert basin(train(mapped_amp(outer(), rho, 4, inner_lr=1.0, norm="per_tensor"))[0]) == "sharp"
  # K = 1 at the mapped epsilon: one step along the clean gradient misses the sharp direction.
  assert basin(train(mapped_amp(outer(), 4 * rho, 1))[0]) == "sharp"


def test_adam_adversary_mapping_follows_sam_across_sync_periods():
  """With sync_period=4 SAM stays in the sharp minimum: so does the mapped AMP; the L2 length of
  SAM's sign step, (s - 1) * rho * sqrt(n), leaves it (too big a ball)."""
  rho, outer = 0.03, lambda: optax.adam(1e-3)
  assert basin(train(sam(outer(), adam_adversary(rho), 4))[0]) == "sharp"
  assert basin(train(mapped_amp(outer(), 3 * rho, 3))[0]) == "sharp"
  assert basin(train(mapped_amp(outer(), 3 * rho * np.sqrt(2), 3))[0]) == "flat"


# ------------------------------------------------------------------ both sections, epsilon = 0


@pytest.mark.parametrize("outer", ["sgd", "momentum", "adam"])
def test_epsilon_zero_in_both_notebook_sections_is_the_plain_optimiser(outer):
  make = {"sgd": lambda: optax.sgd(0.01), "momentum": lambda: optax.sgd(0.01, momentum=0.9),
          "adam": lambda: optax.adam(1e-3)}[outer]
  plain, _ = train(make(), steps=200)
  # Opaque-mode section: the step that always passes grad_fn, the optimiser line changed.
  opaque, _ = train(mapped_amp(make(), 0.0, 1), steps=200)
  # The same arithmetic, but another compiled program: with adam, 1 ulp of rounding in the
  # gradient pass can survive 200 steps (measured 3.7e-9); sgd and momentum are bitwise here.
  np.testing.assert_allclose(opaque, plain, rtol=0, atol=1e-6)
  if outer != "adam":
    np.testing.assert_array_equal(opaque, plain)
  # Default-mode section: the step without grad_fn, unchanged; drop_in_amp takes 2 calls a
  # step (an ascent call, here Delta = 0, and a descent call).
  default, state = train(amp_optax.drop_in_amp(make(), 0.0), steps=400,
                         make_step=step_without_grad_fn)
  assert int(state.count) == 200
  np.testing.assert_allclose(default, plain, rtol=0, atol=1e-6)  # theta + (u - 0): rounding


def test_default_mode_section_switches_with_the_optimiser_line_only():
  """SAM's default mode and drop_in_amp in the same unchanged step both leave the sharp minimum."""
  sam_default = contrib.sam(optax.sgd(0.01), sgd_adversary(0.1), sync_period=2)
  sam_end, _ = train(sam_default, steps=2 * STEPS, make_step=step_without_grad_fn)
  amp_end, state = train(amp_optax.drop_in_amp(optax.sgd(0.01), 0.1, inner_lr=BIG,
                                               norm="global"),
                         steps=2 * STEPS, make_step=step_without_grad_fn)
  assert basin(sam_end) == "flat", sam_end
  assert basin(amp_optax.unperturbed_params(amp_end, state)) == "flat", amp_end
