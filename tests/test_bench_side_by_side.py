"""bench/reference_side_by_side.py without torch or a checkout (nothing is timed)."""
import pytest

from bench import reference_side_by_side as rsbs


def test_sizes_match_the_reference_variants():
  """S1 / B1 are the reference's LightningDiT_S_1 / _B_1 widths, depths and heads."""
  assert rsbs.SIZES["S1"] == (12, 384, 6)
  assert rsbs.SIZES["B1"] == (12, 768, 12)
  for size in rsbs.SIZES:
    c = rsbs.model_config(size)
    assert c["hidden_size"] % c["num_heads"] == 0 and c["input_size"] == 16


@pytest.mark.parametrize("mode", rsbs.MODES)
def test_missing_reference_exits_with_status_2(mode, tmp_path):
  with pytest.raises(SystemExit) as e:
    rsbs.main(["--mode", mode, "--out", str(tmp_path)])
  assert e.value.code == rsbs.MISSING
  with pytest.raises(SystemExit) as e:
    rsbs.main(["--mode", mode, "--reference", str(tmp_path), "--out", str(tmp_path)])
  assert e.value.code == rsbs.MISSING


def test_interleave_alternates_and_collects_both_clocks():
  order = []

  def ref():
    order.append("ref")
    return {"t": 2.0, "cpu": 1.0}

  def jax_side():
    order.append("jax")

  out = rsbs.interleave(ref, jax_side, warmup=1, iters=3, log=lambda _: None)
  assert order == ["ref", "jax"] * 4
  assert out["ref"]["t"] == [2.0] * 3 and out["ref"]["cpu"] == [1.0] * 3
  assert len(out["jax"]["t"]) == len(out["jax"]["cpu"]) == 3
