"""benchmarks/collectives.py: the HLO parser, and the counts of a smoke run on 4 devices."""

import jax
import pytest

from benchmarks import collectives

HLO = """
HloModule m
  %all-reduce.2 = (f32[3,8]{1,0}, f32[3]{0}) all-reduce(%dot.1, %f), channel_id=1, to_apply=%add
  %all-reduce.3 = f32[] all-reduce(%loss), channel_id=2, to_apply=%add
  ROOT %ag = bf16[4,16]{1,0} all-gather(%x), dimensions={0}
  %ars = (f32[10]{0}, f32[2]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ard = (f32[10]{0}, f32[2]{0}) all-reduce-done(%ars)
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(%c), dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  %cp = s32[5]{0} collective-permute(%i), source_target_pairs={{0,1},{1,0}}
  %gte = f32[3]{0} get-tuple-element(%all-reduce.2), index=1
"""


def test_parse_collectives_counts_ops_tensors_and_bytes():
  found = collectives.summarize(collectives.parse_collectives(HLO))
  assert found == {
      # (3*8 + 3) + 1 + (10 + 2) floats of 4 bytes; the -done halves are not counted again.
      "all-reduce": {"ops": 3, "tensors": 5, "scalars": 1, "bytes": 4 * (27 + 1 + 12)},
      # 4*16 bf16 + the output half (8*4 f32) of the async start.
      "all-gather": {"ops": 2, "tensors": 2, "scalars": 0, "bytes": 2 * 64 + 4 * 32},
      "collective-permute": {"ops": 1, "tensors": 1, "scalars": 0, "bytes": 4 * 5},
  }


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < collectives.N_DEVICES,
                    reason="needs 4 (fake) devices: see tests/conftest.py")
def test_smoke_amp_adds_one_gradient_all_reduce_per_inner_step():
  """K = 1: one more all-reduce op than ERM, carrying exactly one gradient (the params' bytes).

  Under shard_map that is the pmean of batch_axis_name; under jit XLA inserts the same
  all-reduce for the perturbed gradient of the sharded batch, so it costs the same.
  """
  lines = []
  rows = collectives.main(["--smoke"], print_fn=lines.append)
  assert "| jit | AMP K=1 per_tensor |" in "\n".join(lines)
  by = {(r["mode"], r["method"]): r for r in rows}
  assert set(by) == {(m, k) for m in ("jit", "shard_map") for k in ("erm", "amp")}
  n_leaves = len(collectives.init_params())
  for mode in ("jit", "shard_map"):
    erm, amp = by[mode, "erm"]["collectives"], by[mode, "amp"]["collectives"]
    assert set(erm) == set(amp) == {"all-reduce"}, (mode, erm, amp)  # data parallel only
    # ERM: the gradient (every leaf) and the loss, in one or more ops.
    assert erm["all-reduce"]["tensors"] == n_leaves + 1
    assert erm["all-reduce"]["bytes"] == collectives.param_bytes() + 4
    assert amp["all-reduce"]["ops"] == erm["all-reduce"]["ops"] + 1, mode
    assert amp["all-reduce"]["tensors"] == erm["all-reduce"]["tensors"] + n_leaves, mode
    assert amp["all-reduce"]["bytes"] - erm["all-reduce"]["bytes"] == collectives.param_bytes()


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < collectives.N_DEVICES,
                    reason="needs 4 (fake) devices: see tests/conftest.py")
def test_grouped_ascent_with_a_group_per_device_costs_erms_all_reduce():
  """Local ascent: only the final mean crosses devices, as ERM's gradient does."""
  erm, grouped = collectives.VARIANTS[0], collectives.VARIANTS[4]
  assert grouped.groups == collectives.N_DEVICES
  rows = collectives.measure(jax.devices()[:collectives.N_DEVICES], modes=("jit", "shard_map"),
                             variants=(erm, grouped))
  by = {(r["mode"], r["method"]): r for r in rows}
  for mode in ("jit", "shard_map"):
    e, a = by[mode, "erm"], by[mode, "amp"]
    assert a["all_reduce_ops"] == e["all_reduce_ops"], mode
    # The same gradient bytes; under jit two diagnostic scalars (the groups' mean norms) ride
    # along in the same op.
    assert 0 <= a["all_reduce_bytes"] - e["all_reduce_bytes"] <= 8, mode
