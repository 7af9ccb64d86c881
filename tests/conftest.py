"""Test set-up: 8 fake CPU devices for the multi-device tests, and the ``x64`` fixture.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before any
test imports jax. An XLA_FLAGS already set by the caller is extended.
"""

import os

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def x64():
  """float64 in this test (references compared at float64), the previous setting restored."""
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS above)

  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


@pytest.fixture(params=["loop", "vmap"])
def group_passes(request, monkeypatch):
  """Runs the test with the per-group passes both ways: the unrolled loop (CPU's default) and
  one jax.vmap (GPU/TPU's), which must compute the same thing. Modules whose every test does
  so say ``pytestmark = pytest.mark.usefixtures("group_passes")``."""
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS above)

  from amp_optax import _grouped  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(_grouped, "_loop_over_groups", lambda *_: request.param == "loop")
  jax.clear_caches()  # a step traced in the other mode must not be reused
  return request.param
