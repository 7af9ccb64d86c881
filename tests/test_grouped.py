"""Grouped ascent (grouped_amp(epsilon, num_groups=G)): one Delta per group of m examples.

Against amp() at G = 1 (bitwise), an independent NumPy reference at G > 1, and itself on
1, 2, 4 and 8 (fake CPU) devices, with jit, shard_map and pmap.
"""

from functools import partial
import inspect

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import amp_optax

G = 8


def loss_fn(p, b):
  h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] - b["y"]) ** 2)


def numpy_grad(p, x, y):
  """The gradient of loss_fn by hand, in float64."""
  h = np.tanh(x @ p["w1"] + p["b1"])
  residual = h @ p["w2"] - y
  d_out = 2.0 * residual / residual.size
  d_pre = (d_out @ p["w2"].T) * (1.0 - h ** 2)
  return {"w1": x.T @ d_pre, "b1": d_pre.sum(0), "w2": h.T @ d_out}


def make_problem(n=32):
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k[0], (5, 8)) * 0.8, "b1": jax.random.normal(k[1], (8,)) * 0.1,
            "w2": jax.random.normal(k[2], (8, 2)) * 0.8}
  kx, ky = jax.random.split(k[3])
  batch = {"x": jax.random.normal(kx, (n, 5)), "y": jax.random.normal(ky, (n, 2))}
  return params, batch


def stack(tree):
  return jax.tree.map(lambda x: x[None], tree)


def unstack(tree):
  return jax.tree.map(lambda x: x[0], tree)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("relative", [False, True])
def test_one_group_is_amp_bitwise(k, norm, relative):
  params, batch = make_problem()
  eps = 0.05 if relative else 0.2
  tx = amp_optax.amp(eps, inner_steps=k, norm=norm, relative=relative)
  grouped = amp_optax.grouped_amp(eps, num_groups=1, inner_steps=k, norm=norm, relative=relative)

  @jax.jit
  def today(p):
    return tx.update(jax.grad(loss_fn)(p, batch), tx.init(p), p,
                     grad_fn=lambda q, _: jax.grad(loss_fn)(q, batch))

  @jax.jit
  def one_group(p):
    return grouped.update(stack(jax.grad(loss_fn)(p, batch)), grouped.init(p), p,
                          grad_fn=lambda q, _: stack(jax.grad(loss_fn)(unstack(q), batch)))

  (want, want_state), (got, got_state) = today(params), one_group(params)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert isinstance(got_state, amp_optax.AmpState)
  for name in ("count", "delta_norm", "clean_grad_norm", "perturbed_grad_norm"):
    assert float(getattr(want_state, name)) == float(getattr(got_state, name)), name


def reference(params, batch, groups, eps, lr, k, norm):
  """Grouped AMP from the algorithm, float64 NumPy: mean over groups of grad at theta+Delta_j."""
  theta = {n: np.asarray(v, np.float64) for n, v in params.items()}
  xs = np.asarray(batch["x"], np.float64).reshape(groups, -1, 5)
  ys = np.asarray(batch["y"], np.float64).reshape(groups, -1, 2)
  total = {n: np.zeros_like(v) for n, v in theta.items()}
  for x, y in zip(xs, ys):
    delta = {n: np.zeros_like(v) for n, v in theta.items()}
    g = numpy_grad(theta, x, y)
    for _ in range(k):
      step = {n: delta[n] + lr * g[n] for n in theta}
      if norm == "per_tensor":
        delta = {n: v * min(1.0, eps / max(np.linalg.norm(v), 1e-300)) for n, v in step.items()}
      else:
        size = np.sqrt(sum(np.sum(v ** 2) for v in step.values()))
        delta = {n: v * min(1.0, eps / max(size, 1e-300)) for n, v in step.items()}
      g = numpy_grad({n: theta[n] + delta[n] for n in theta}, x, y)
    total = {n: total[n] + g[n] / groups for n in theta}
  return total


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_groups_match_a_numpy_reference(k, norm):
  params, batch = make_problem()
  tx = amp_optax.grouped_amp(0.3, num_groups=4, inner_lr=2.0, inner_steps=k, norm=norm)
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
      params, amp_optax.group_batch(batch, 4))
  got, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, grad_fn=amp_grad_fn))(grads, params)
  want = reference(params, batch, 4, 0.3, 2.0, k, norm)
  for n in params:
    np.testing.assert_allclose(got[n], want[n], rtol=2e-5, atol=1e-6)
  ungrouped = reference(params, batch, 1, 0.3, 2.0, k, norm)
  assert max(np.max(np.abs(want[n] - ungrouped[n])) for n in params) > 1e-3  # G matters


@pytest.mark.slow
def test_epsilon_zero_is_the_whole_batch_gradient():
  params, batch = make_problem()
  tx = amp_optax.grouped_amp(0.0, num_groups=4)
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
      params, amp_optax.group_batch(batch, 4))
  got, _ = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
  want = jax.grad(loss_fn)(params, batch)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_errors_say_what_to_change():
  params, batch = make_problem()
  tx = amp_optax.grouped_amp(0.1, num_groups=4)
  with pytest.raises(ValueError, match=r"^grouped_amp\(num_groups=4\): .*leading group axis.*"
                     r"grouped_value_and_grad"):
    tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params,
              grad_fn=lambda q, _: jax.grad(loss_fn)(q, batch))
  with pytest.raises(ValueError, match=r"does not split into 5 groups"):
    amp_optax.group_batch(batch, 5)


@pytest.mark.parametrize("num_groups, error", [
    (0, ValueError), (-2, ValueError), (2.0, TypeError), ("4", TypeError), (True, TypeError),
    (None, TypeError), (jnp.asarray(4), TypeError)])
def test_grouped_amp_rejects_a_num_groups_that_is_not_a_positive_int(num_groups, error):
  with pytest.raises(error, match=r"^grouped_amp\(\): `num_groups` must be"):
    amp_optax.grouped_amp(0.1, num_groups=num_groups)


def test_grouped_amp_needs_num_groups_and_amp_has_none():
  with pytest.raises(TypeError, match="num_groups"):
    amp_optax.grouped_amp(0.1)
  assert "num_groups" not in inspect.signature(amp_optax.amp).parameters
  with pytest.raises(TypeError, match="num_groups"):
    amp_optax.amp(0.1, num_groups=4)


def test_grouped_amp_takes_no_ascend():
  """ascend (and reuse) are amp's: grouped_amp says so instead of ignoring it."""
  params, batch = make_problem()
  tx = amp_optax.grouped_amp(0.1, num_groups=4)
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
      params, amp_optax.group_batch(batch, 4))
  for ascend in (False, True):
    with pytest.raises(TypeError, match=r"grouped_amp\(\): `ascend` is an argument of amp"):
      tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn, ascend=ascend)
  assert "reuse_correction" not in inspect.signature(amp_optax.grouped_amp).parameters


@pytest.mark.parametrize("num_groups, error", [
    (0, ValueError), (-1, ValueError), (2.0, TypeError), (None, TypeError)])
def test_group_batch_rejects_a_bad_num_groups_by_name(num_groups, error):
  """Not a ZeroDivisionError (0) or a reshape error: an error naming num_groups."""
  _, batch = make_problem()
  with pytest.raises(error, match=r"^group_batch\(\): `num_groups` must be"):
    amp_optax.group_batch(batch, num_groups)


def test_group_batch_rejects_a_0d_leaf():
  _, batch = make_problem()
  for scalar in (jnp.asarray(1.0), 1.0, np.float32(2.0)):
    with pytest.raises(ValueError, match=r"^group_batch\(\): .*leading example axis.*0-d leaf"):
      amp_optax.group_batch({**batch, "scale": scalar}, 4)


def test_grouped_value_and_grad_is_curried():
  """grouped_value_and_grad(loss_fn, has_aux=...) returns f(params, *grouped_args), as
  jax.value_and_grad does: per-group losses and gradients, against a loop over the groups."""
  params, batch = make_problem()
  grouped = amp_optax.group_batch(batch, 4)
  losses, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, grouped)
  assert losses.shape == (4,)
  for j in range(4):
    group = jax.tree.map(lambda x, j=j: x[j], grouped)
    np.testing.assert_allclose(losses[j], loss_fn(params, group), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x, j=j: x[j], grads)),
                    jax.tree.leaves(jax.grad(loss_fn)(params, group))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # amp_grad_fn: group j's gradient at group j's parameters.
  stacked = jax.tree.map(lambda p: jnp.stack([p * (1.0 + 0.1 * j) for j in range(4)]), params)
  at = amp_grad_fn(stacked, 0)
  for j in range(4):
    want = jax.grad(loss_fn)(jax.tree.map(lambda p, j=j: p[j], stacked),
                             jax.tree.map(lambda x, j=j: x[j], grouped))
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x, j=j: x[j], at)),
                    jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # has_aux: (loss, aux) per group; amp_grad_fn returns the gradients only.
  aux_loss = lambda p, b: (loss_fn(p, b), {"n": b["x"].shape[0]})
  (aux_losses, aux), aux_grads, aux_grad_fn = amp_optax.grouped_value_and_grad(
      aux_loss, has_aux=True)(params, grouped)
  np.testing.assert_array_equal(aux_losses, losses)
  np.testing.assert_array_equal(aux["n"], np.full((4,), 8))
  for a, b in zip(jax.tree.leaves(aux_grads), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(aux_grad_fn(stacked, 0)) == jax.tree.structure(params)
  # The 0.1 form, grouped_value_and_grad(loss_fn, params, grouped_batch), is gone.
  with pytest.raises(TypeError):
    amp_optax.grouped_value_and_grad(loss_fn, params, grouped)


def training_run(mesh_devices, steps=3, k=2):
  """Three grouped AMP steps under jit, the group axis sharded over ``mesh_devices`` devices."""
  params, batch = make_problem()
  tx = optax.chain(amp_optax.grouped_amp(0.2, num_groups=G, inner_steps=k),
                   optax.sgd(0.1, momentum=0.9))
  grouped = amp_optax.group_batch(batch, G)
  mesh = jax.make_mesh((mesh_devices,), ("data",), devices=jax.devices()[:mesh_devices])
  grouped = jax.device_put(grouped, NamedSharding(mesh, P("data")))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)

  @jax.jit
  def step(params, opt_state, grouped):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, grouped)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state, grouped)
  return jax.tree.map(np.asarray, params), step, (params, opt_state, grouped)


# Across device counts the groups' arithmetic is the same; only the final mean's reduction
# order may differ: float32 rounding, measured < 1e-7 here.
ATOL = 1e-6


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_fixed_groups_give_the_same_parameters_on_1_2_4_8_devices():
  one, _, _ = training_run(1)
  for n in (2, 4, 8):
    got, _, _ = training_run(n)
    for name in one:
      np.testing.assert_allclose(got[name], one[name], atol=ATOL, rtol=0, err_msg=f"{n} devices")


def all_reduces(compiled_text):
  return sum(1 for line in compiled_text.splitlines()
             if "all-reduce(" in line or "all-reduce-start(" in line)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_one_group_per_device_ascends_without_collectives():
  """G devices, one group each: the step's all-reduces are ERM's (the final mean only)."""
  _, step, args = training_run(8, steps=0, k=2)
  amp_count = all_reduces(step.lower(*args).compile().as_text())
  params, opt_state, grouped = args
  sgd = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def erm_step(params, opt_state, grouped):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), grouped)
    grads = jax.grad(loss_fn)(params, flat)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  erm_count = all_reduces(erm_step.lower(params, sgd.init(params), grouped).compile().as_text())
  assert amp_count == erm_count, (amp_count, erm_count)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_shard_map_and_pmap_with_global_num_groups_match_jit(devices):
  want, _, _ = training_run(1)
  params, batch = make_problem()
  grouped = amp_optax.group_batch(batch, G)
  tx = optax.chain(amp_optax.grouped_amp(0.2, num_groups=G, inner_steps=2,
                                         batch_axis_name="data"),
                   optax.sgd(0.1, momentum=0.9))
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Explicit,))

  def body(params, opt_state, local):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, local)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")),
                               out_specs=(P(), P()), check_vma=False))
  p, s = params, tx.init(params)
  sharded = jax.device_put(grouped, NamedSharding(mesh, P("data")))
  for _ in range(3):
    p, s = step(p, s, sharded)
  for name in want:
    np.testing.assert_allclose(np.asarray(p[name]), want[name], atol=ATOL, rtol=0)

  if devices == G:  # pmap: one group per device
    pstep = jax.pmap(body, axis_name="data", in_axes=(None, None, 0), out_axes=None)
    tx_p = tx
    p, s = params, tx_p.init(params)
    per_device = jax.tree.map(lambda x: x.reshape((devices, 1) + x.shape[1:]), grouped)
    for _ in range(3):
      p, s = pstep(p, s, per_device)
    for name in want:
      np.testing.assert_allclose(np.asarray(p[name]), want[name], atol=ATOL, rtol=0)


def test_without_batch_axis_name_local_groups_under_shard_map_raise():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  params, batch = make_problem()
  grouped = amp_optax.group_batch(batch, 4)
  tx = amp_optax.grouped_amp(0.2, num_groups=2)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])

  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
  def body(params, local):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, local)
    return tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)[0]

  with pytest.raises(ValueError, match=r"batch_axis_name='data'"):
    jax.jit(body)(params, jax.device_put(grouped, NamedSharding(mesh, P("data"))))


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_shard_map_with_check_vma_through_the_helper_matches_jit():
  """check_vma=True (JAX's default): the helper takes per-group gradients w.r.t. device-varying
  parameters, so they are not summed over the devices; same parameters as on one device."""
  want, _, _ = training_run(1)
  params, batch = make_problem()
  grouped = amp_optax.group_batch(batch, G)
  tx = optax.chain(amp_optax.grouped_amp(0.2, num_groups=G, inner_steps=2,
                                         batch_axis_name="data"),
                   optax.sgd(0.1, momentum=0.9))
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Explicit,))

  def body(params, opt_state, local):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, local)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")),
                               out_specs=(P(), P())))
  p, s = params, tx.init(params)
  sharded = jax.device_put(grouped, NamedSharding(mesh, P("data")))
  for _ in range(3):
    p, s = step(p, s, sharded)
  for name in want:
    np.testing.assert_allclose(np.asarray(p[name]), want[name], atol=ATOL, rtol=0)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_shard_map_with_check_vma_and_summed_per_group_gradients_raises():
  """Per-group gradients taken by hand w.r.t. the replicated parameters come out summed over
  the devices under check_vma=True: an error that names pcast, not a run with loss x n."""
  params, batch = make_problem()
  grouped = amp_optax.group_batch(batch, G)
  tx = amp_optax.grouped_amp(0.2, num_groups=G, batch_axis_name="data")
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])

  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  def body(params, local):
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, local)
    per_group = jax.vmap(jax.grad(loss_fn))
    return tx.update(grads, tx.init(params), params,
                     grad_fn=lambda sp, _: per_group(sp, local))[0]

  with pytest.raises(ValueError, match="pcast"):
    jax.jit(body)(params, jax.device_put(grouped, NamedSharding(mesh, P("data"))))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_global_num_groups_with_each_device_grouping_into_all_of_them_raises():
  """The mistake of grouping each device's batch into the global G: G x n groups, loudly."""
  params, batch = make_problem()
  tx = amp_optax.grouped_amp(0.2, num_groups=G, batch_axis_name="data")
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])

  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
  def body(params, local_batch):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
        params, amp_optax.group_batch(local_batch, G))
    return tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)[0]

  with pytest.raises(ValueError, match=r"counts the groups over all 4 devices.*group_batch\("
                                       r"local_batch, 2\)"):
    jax.jit(body)(params, jax.device_put(batch, NamedSharding(mesh, P("data"))))


def _conv_loss(p, b):
  y = jax.lax.conv_general_dilated(b["x"], p["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean((y.mean((1, 2)) - b["y"]) ** 2)


def _grouped_jaxpr_ops(loss, params, batch, groups=4):
  def step(params, grouped):
    _, grads, grad_fn = amp_optax.grouped_value_and_grad(loss)(params, grouped)
    return grads, grad_fn(jax.tree.map(lambda g: jnp.stack([g] * groups), params), 0)

  jaxpr = jax.make_jaxpr(step)(params, amp_optax.group_batch(batch, groups)).jaxpr
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  return convs, dots


def test_per_group_passes_loop_over_convolutions_and_vmap_the_rest_on_cpu():
  # On CPU a convolution with per-group kernels under vmap is a grouped convolution, which
  # XLA:CPU runs slowly: with one, the passes are a loop of G ordinary convolutions; without,
  # one vmapped pass (batched matrix products), since a loop of G small passes is slower there.
  assert jax.default_backend() == "cpu"
  conv_params = {"k": jnp.ones((3, 3, 2, 4)) * 0.1}
  conv_batch = {"x": jnp.ones((8, 6, 6, 2)), "y": jnp.zeros((8, 4))}
  convs, _ = _grouped_jaxpr_ops(_conv_loss, conv_params, conv_batch)
  assert all(e.params["feature_group_count"] == 1 and e.params["batch_group_count"] == 1
             for e in convs), [e.params for e in convs]
  assert len(convs) == 4 * 2 * 2  # G groups x (clean, perturbed pass) x (forward, kernel grad)
  params, batch = make_problem()
  _, dots4 = _grouped_jaxpr_ops(loss_fn, params, batch, groups=4)
  _, dots2 = _grouped_jaxpr_ops(loss_fn, params, batch, groups=2)
  assert dots4 and len(dots4) == len(dots2)  # one vmapped pass whatever G


def test_per_group_passes_are_one_vmap_off_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  jax.clear_caches()
  convs, _ = _grouped_jaxpr_ops(_conv_loss, {"k": jnp.ones((3, 3, 2, 4)) * 0.1},
                                {"x": jnp.ones((8, 6, 6, 2)), "y": jnp.zeros((8, 4))})
  # One vmapped pass: the perturbed pass's per-group kernels make grouped convolutions.
  assert len(convs) < 4 * 2 * 2
  assert any(4 in (e.params["feature_group_count"], e.params["batch_group_count"]) for e in convs)
