"""Sharpness measures of a loss at given parameters.

Two common ways to say how sharp a minimum is, both pure functions of a loss
function and a parameter pytree, usable inside :func:`jax.jit`:

* :func:`hessian_top_eigenvalue`: the dominant eigenvalue of the Hessian of the
  loss, by power iteration on Hessian-vector products (forward-over-reverse
  differentiation, never forming the Hessian).
* :func:`random_perturbation_loss_increase`: the mean and spread of
  ``L(params + u) - L(params)`` over random directions ``u`` of a fixed norm.

Only floating-point leaves of ``params`` are differentiated or perturbed; other
leaves (integer counters, for instance) are passed to ``loss_fn`` unchanged.
Norms and inner products are accumulated in at least float32 (float64 when the
parameters are float64, with ``jax_enable_x64`` on).
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from amp_optax import _projection

LossFn = Callable[..., Any]
PyTree = Any

NORMS = ("global", "per_tensor")


class PerturbationLossIncrease(NamedTuple):
  """Result of :func:`random_perturbation_loss_increase`.

  Attributes:
    mean: mean over the samples of ``L(params + u) - L(params)``.
    std: standard deviation of the samples (with Bessel's correction when
      there are at least two samples, else 0).
    increases: the ``num_samples`` individual increases, sample ``i`` taken
      along ``random_direction(jax.random.split(key, num_samples)[i], ...)``.
    base_loss: ``L(params)``.
  """

  mean: jax.Array
  std: jax.Array
  increases: jax.Array
  base_loss: jax.Array


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _split_float_leaves(
    params: PyTree,
) -> tuple[list[Any], Any, list[int]]:
  leaves, treedef = jax.tree.flatten(params)
  idx = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]
  return leaves, treedef, idx


def _merge(leaves: list[Any], treedef: Any, idx: list[int], new: list[Any]) -> PyTree:
  merged = list(leaves)
  for i, x in zip(idx, new, strict=True):
    merged[i] = x
  return jax.tree.unflatten(treedef, merged)


def _scalar_loss(loss_fn: LossFn, has_aux: bool) -> LossFn:
  def fn(*args):
    out = loss_fn(*args)
    return out[0] if has_aux else out
  return fn


def _vdot(xs: list[jax.Array], ys: list[jax.Array]) -> jax.Array:
  """Real inner product of two lists of arrays, in the accumulation dtype."""
  if not xs:
    return jnp.zeros((), jnp.float32)
  terms = []
  for x, y in zip(xs, ys, strict=True):
    dtype = _projection.accumulation_dtype(jnp.result_type(x, y))
    terms.append(jnp.real(jnp.vdot(x.astype(dtype), y.astype(dtype))))
  dtype = jnp.result_type(*terms)
  return jnp.asarray(sum(t.astype(dtype) for t in terms), dtype)


def _normalize(xs: list[jax.Array]) -> list[jax.Array]:
  norm = _projection.global_l2_norm(xs)
  scale = 1.0 / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)
  return [(x * scale).astype(x.dtype) for x in xs]


def _gaussian_like(key: jax.Array, leaves: list[jax.Array]) -> list[jax.Array]:
  if not leaves:
    return []
  keys = jax.random.split(key, len(leaves))
  return [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
          for k, x in zip(keys, leaves, strict=True)]


def hessian_vector_product(
    loss_fn: LossFn,
    params: PyTree,
    vector: PyTree,
    *args: Any,
    has_aux: bool = False,
) -> PyTree:
  """Hessian of ``loss_fn`` at ``params`` times ``vector``, without the Hessian.

  Forward-over-reverse: the :func:`jax.jvp` of :func:`jax.grad`, about the
  cost of two gradient evaluations.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amp_optax import diagnostics
    >>> loss_fn = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p ** 2)
    >>> diagnostics.hessian_vector_product(
    ...     loss_fn, jnp.zeros(2), jnp.ones(2))
    Array([1., 3.], dtype=float32)

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar (or a pair
      ``(scalar, aux)`` with ``has_aux=True``).
    params: the point at which the Hessian is taken, a pytree.
    vector: a pytree like ``params``; its non-floating leaves are ignored.
    *args: further positional arguments of ``loss_fn`` (a batch, say); they
      are not differentiated.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    A pytree like ``params``: ``H @ vector`` on floating leaves, the leaves of
    ``params`` themselves elsewhere.
  """
  scalar_loss = _scalar_loss(loss_fn, has_aux)
  leaves, treedef, idx = _split_float_leaves(params)
  vec_leaves = treedef.flatten_up_to(vector)

  def grad_of_float_leaves(float_leaves):
    fn = lambda fl: scalar_loss(_merge(leaves, treedef, idx, fl), *args)
    return jax.grad(fn)(float_leaves)

  primals = [leaves[i] for i in idx]
  tangents = [jnp.asarray(vec_leaves[i]).astype(jnp.result_type(leaves[i])) for i in idx]
  _, hv = jax.jvp(grad_of_float_leaves, (primals,), (tangents,))
  return _merge(leaves, treedef, idx, hv)


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    *args: Any,
    key: jax.Array | None = None,
    num_iters: int = 20,
    init_vector: PyTree | None = None,
    return_vector: bool = False,
    has_aux: bool = False,
    unroll: int | bool = 1,
) -> jax.Array | tuple[jax.Array, PyTree]:
  r"""Dominant eigenvalue of the Hessian of the loss, by power iteration.

  Starting from a random unit vector :math:`v` (or ``init_vector``),
  ``num_iters`` times computes :math:`Hv`, the Rayleigh quotient
  :math:`\lambda = v^\top H v`, and :math:`v \leftarrow Hv / \|Hv\|`; returns
  the last :math:`\lambda`. Each iteration costs one Hessian-vector product
  (:func:`hessian_vector_product`); the loop is a :func:`jax.lax.fori_loop`,
  so compile time does not grow with ``num_iters`` (unless ``unroll``).

  Power iteration finds the eigenvalue of largest *magnitude*. Near a minimum
  that is the largest (positive) eigenvalue, the usual sharpness measure; if
  the Hessian has a negative eigenvalue of larger magnitude, that one is
  returned (with its sign). Convergence is geometric in the ratio of the two
  largest magnitudes, so close eigenvalues need more iterations. To iterate
  further later, pass the returned vector back as ``init_vector``: the
  iteration continues where it stopped.

  On CPU, XLA runs convolutions inside loops far slower than outside them
  (`jax#12868 <https://github.com/jax-ml/jax/issues/12868>`_): for a
  convolutional network on CPU pass ``unroll=True`` (more compile time, which
  then grows with ``num_iters``; the run is often 10-20 times faster).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from amp_optax import diagnostics
    >>> a = jnp.diag(jnp.array([4.0, 1.0, 0.5]))
    >>> loss_fn = lambda p, a: 0.5 * p @ a @ p
    >>> lam = diagnostics.hessian_top_eigenvalue(
    ...     loss_fn, jnp.zeros(3), a, key=jax.random.key(0), num_iters=30)
    >>> round(float(lam), 4)
    4.0

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar loss (or
      ``(loss, aux)`` with ``has_aux=True``). For a model with batch
      statistics, close over them and use the model's evaluation (or a fixed
      training) mode, so that the loss is a deterministic function of
      ``params``.
    params: the point at which the Hessian is taken, a pytree of arrays.
    *args: further positional arguments of ``loss_fn`` (a fixed batch, say);
      they are not differentiated.
    key: a :func:`jax.random.key` for the random start; needed unless
      ``init_vector`` is given.
    num_iters: number of Hessian-vector products, a Python int >= 1.
    init_vector: optional start vector, a pytree like ``params`` (a previous
      call's vector, to continue its iteration). It need not be normalised,
      but must not be zero.
    return_vector: also return the unit eigenvector estimate.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    unroll: the ``unroll`` argument of the :func:`jax.lax.fori_loop`: 1 (a
      loop), ``True`` (fully unrolled) or an unrolling factor.

  Returns:
    The eigenvalue estimate, a scalar in the accumulation dtype of the
    parameters (float32, or float64 for float64 parameters). With
    ``return_vector=True``, a pair ``(eigenvalue, vector)`` where ``vector``
    is the next iterate :math:`Hv / \|Hv\|`, a pytree like ``params`` of
    global L2 norm 1 (zero on non-floating leaves).

  References:
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
    raise ValueError(f"hessian_top_eigenvalue(): `num_iters` must be a Python int >= 1, "
                     f"got {num_iters!r}.")
  leaves, treedef, idx = _split_float_leaves(params)
  primals = [leaves[i] for i in idx]
  if init_vector is not None:
    init = treedef.flatten_up_to(init_vector)
    v0 = [jnp.asarray(init[i]).astype(jnp.result_type(leaves[i])) for i in idx]
  elif key is not None:
    v0 = _gaussian_like(key, primals)
  else:
    raise ValueError("hessian_top_eigenvalue(): pass `key` (a jax.random.key) or "
                     "`init_vector` to start the power iteration.")
  v0 = _normalize(v0)

  def hvp(v):
    full = hessian_vector_product(
        loss_fn, params, _merge(leaves, treedef, idx, v), *args, has_aux=has_aux)
    full_leaves = treedef.flatten_up_to(full)
    hv = [full_leaves[i] for i in idx]
    return [h.astype(x.dtype) for h, x in zip(hv, v, strict=True)]

  def body(_, carry):
    v, _ = carry
    hv = hvp(v)
    return _normalize(hv), _vdot(v, hv)

  zero = jnp.zeros((), _projection.global_l2_norm(v0).dtype)
  v, eigenvalue = jax.lax.fori_loop(0, num_iters, body, (v0, zero), unroll=unroll)
  if not return_vector:
    return eigenvalue
  zeros = [jnp.zeros_like(x) for x in leaves]
  return eigenvalue, _merge(zeros, treedef, idx, v)


def random_direction(
    key: jax.Array,
    params: PyTree,
    radius: float | jax.Array,
    norm: str = "global",
) -> PyTree:
  """A random direction of a given norm, uniform on the sphere.

  Gaussian noise rescaled to the sphere: isotropic, so uniformly distributed
  on the sphere of ``radius`` (``norm="global"``) or on the product of one
  sphere of ``radius`` per floating leaf (``norm="per_tensor"``, the boundary
  of the ball that :func:`amp_optax.amp` uses by default; the global norm is
  then ``radius * sqrt(number of floating leaves)``).

  Examples:
    >>> import jax, jax.numpy as jnp, amp_optax
    >>> from amp_optax import diagnostics
    >>> params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    >>> u = diagnostics.random_direction(jax.random.key(0), params, 0.5)
    >>> round(float(amp_optax.global_l2_norm(u)), 4)
    0.5

  Args:
    key: a :func:`jax.random.key`.
    params: a pytree of arrays; the direction has its structure, shapes and
      dtypes.
    radius: the norm of the direction, a non-negative scalar.
    norm: ``"global"`` or ``"per_tensor"``, as above.

  Returns:
    A pytree like ``params``; zero on non-floating leaves.
  """
  if norm not in NORMS:
    raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
  leaves, treedef, idx = _split_float_leaves(params)
  noise = _gaussian_like(key, [leaves[i] for i in idx])
  if norm == "global":
    unit = _normalize(noise)
  else:
    unit = [_normalize([x])[0] for x in noise]
  direction = [(x * jnp.asarray(radius, x.dtype)).astype(x.dtype) for x in unit]
  zeros = [jnp.zeros_like(x) for x in leaves]
  return _merge(zeros, treedef, idx, direction)


def random_perturbation_loss_increase(
    loss_fn: LossFn,
    params: PyTree,
    *args: Any,
    radius: float | jax.Array,
    num_samples: int = 10,
    key: jax.Array,
    norm: str = "global",
    has_aux: bool = False,
    unroll: int | bool = 1,
) -> PerturbationLossIncrease:
  r"""Loss increase along random directions of fixed norm.

  Draws ``num_samples`` directions :math:`u_i` with :func:`random_direction`
  and returns statistics of :math:`L(\theta + u_i) - L(\theta)`. For small
  radii at a minimum this is about :math:`\tfrac{1}{2} r^2\,
  \mathrm{tr}(H)/n` on average (``norm="global"``, :math:`n` parameters): a
  measure of the average curvature, where :func:`hessian_top_eigenvalue`
  gives the largest. The samples are evaluated one after the other (a
  :func:`jax.lax.scan`), so memory does not grow with ``num_samples``; on CPU
  pass ``unroll=True`` for a convolutional network (see
  :func:`hessian_top_eigenvalue`).

  In float32 the difference of two nearly equal losses loses precision: use
  radii for which the increase is well above ``1e-6 * loss``, or float64.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from amp_optax import diagnostics
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p ** 2)  # Hessian = identity
    >>> out = diagnostics.random_perturbation_loss_increase(
    ...     loss_fn, jnp.zeros(5), radius=0.1, num_samples=4,
    ...     key=jax.random.key(0))
    >>> round(float(out.mean), 6)  # 0.5 * 0.1**2 along every direction
    0.005

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar loss (or
      ``(loss, aux)`` with ``has_aux=True``), deterministic in ``params``.
    params: the point to perturb, a pytree of arrays.
    *args: further positional arguments of ``loss_fn`` (a fixed batch, say).
    radius: norm of each perturbation: the global L2 norm (``"global"``) or
      the L2 norm of each floating leaf's perturbation (``"per_tensor"``).
    num_samples: number of random directions, a Python int >= 1.
    key: a :func:`jax.random.key`; sample ``i`` uses
      ``jax.random.split(key, num_samples)[i]``.
    norm: ``"global"`` or ``"per_tensor"``; see :func:`random_direction`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    unroll: the ``unroll`` argument of the :func:`jax.lax.scan` over samples.

  Returns:
    A :class:`PerturbationLossIncrease` with the mean, standard deviation and
    individual increases, and the unperturbed loss.

  References:
    Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
    Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, ICLR 2017.

    Jiang et al., `Fantastic Generalization Measures and Where to Find Them
    <https://arxiv.org/abs/1912.02178>`_, ICLR 2020.
  """
  if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
    raise ValueError("random_perturbation_loss_increase(): `num_samples` must be a Python "
                     f"int >= 1, got {num_samples!r}.")
  if norm not in NORMS:
    raise ValueError(f"random_perturbation_loss_increase(): `norm` must be one of {NORMS}, "
                     f"got {norm!r}.")
  scalar_loss = _scalar_loss(loss_fn, has_aux)
  base_loss = scalar_loss(params, *args)

  def increase(k):
    u = random_direction(k, params, radius, norm)
    moved = jax.tree.map(lambda p, d: p + d if _is_float(p) else p, params, u)
    return scalar_loss(moved, *args) - base_loss

  _, increases = jax.lax.scan(lambda c, k: (c, increase(k)), None,
                              jax.random.split(key, num_samples), unroll=unroll)
  mean = jnp.mean(increases)
  std = jnp.std(increases, ddof=1) if num_samples > 1 else jnp.zeros_like(mean)
  return PerturbationLossIncrease(mean=mean, std=std, increases=increases, base_loss=base_loss)
