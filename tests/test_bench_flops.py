"""The analytic FLOP counter of bench/flops.py (not a benchmark: nothing is timed)."""
import dataclasses

import jax
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from bench import common, flops
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT

SMALL = DiTConfig(input_size=8, hidden_size=128, depth=2, num_heads=4, repa_dim=64,
                  repa_projector_dim=96)


@pytest.mark.parametrize("variant,gflop,train_tflop", [
    ("B", 50, 38), ("XL", 241, 185), ("XXL", 363, 279)])
def test_reference_numbers(variant, gflop, train_tflop):
  """docs/method.md §16: forward per image with the REPA head, train step at global batch 256."""
  count = flops.forward_flops(DiTConfig.variant(variant))
  assert count.total / 1e9 == pytest.approx(gflop, rel=0.01)
  assert count.train_step == 3 * count.total
  assert count.train_step * 256 / 1e12 == pytest.approx(train_tflop, rel=0.01)


@pytest.mark.parametrize("variant", ["B", "XL", "XXL"])
def test_per_block_formula(variant):
  """Per block and token 24·D² + 4·T·D when the SwiGLU hidden is 8D/3."""
  cfg = DiTConfig.variant(variant)
  d, t = cfg.hidden_size, cfg.num_tokens
  count = flops.forward_flops(cfg)
  assert count.blocks_linear == cfg.depth * t * 24 * d * d
  assert count.attention == cfg.depth * t * 4 * t * d
  assert flops.forward_flops(cfg, repa=False).repa == 0


def _kernel_sizes(cfg):
  """(per-token kernel elements, per-image kernel elements) read off the module."""
  model = nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0)))
  per_token = per_image = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = [str(p) for p in path]
    if names[-1] != "kernel":
      continue
    size = int(var.get_value().size)
    if "adaLN_modulation" in names or any(n.startswith("t_embedder") for n in names):
      per_image += size
    else:
      per_token += size
  return per_token, per_image


@pytest.mark.parametrize("delta_t", [0.3, 0.0])
def test_counts_match_the_module_weights(delta_t):
  """2 FLOP per kernel weight: per token for token-wise layers, once for adaLN and the
  timestep embedders; plus the attention term."""
  cfg = dataclasses.replace(SMALL, delta_t=delta_t)
  per_token, per_image = _kernel_sizes(cfg)
  count = flops.forward_flops(cfg)
  t = cfg.num_tokens
  assert count.total - count.attention == 2 * per_token * t + 2 * per_image
  assert count.attention == cfg.depth * 4 * t * t * cfg.hidden_size


@pytest.mark.parametrize("repa", [True, False])
def test_against_xla_cost_analysis(repa):
  """XLA also counts elementwise work, so it sits slightly above the analytic count."""
  xla = flops.xla_forward_flops(SMALL, batch=2, repa=repa)
  analytic = flops.forward_flops(SMALL, repa=repa).total
  assert 1.0 <= xla / analytic < 1.06, (xla, analytic)


def test_device_peaks():
  assert common.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
  assert common.device_peak_tflops("NVIDIA H100 PCIe") == 756
  assert common.device_peak_tflops("TPU v5 lite") == 197
  assert common.device_peak_tflops("TPU v5p") == 459
  assert common.device_peak_tflops("TPU v6 lite") == 918
  assert common.device_peak_tflops(jax.devices("cpu")[0].device_kind) is None


def test_benchmark_recipe_is_the_configs():
  """bench.train_step builds the SFD recipe without ml_collections: from the dataclass
  defaults and optim.DEFAULT_ADAMW, which must equal configs/common.py's recipe."""
  import dataclasses as dc  # pylint: disable=import-outside-toplevel
  from bench import train_step as bench_step  # pylint: disable=import-outside-toplevel
  from configs import common as config_common  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.objective import ObjectiveConfig  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import optim  # pylint: disable=import-outside-toplevel
  c = config_common.base_config("XL")
  opt = c.optimizer.to_dict()
  # the step options of config.optimizer: the bench uses make_train_step's defaults
  step_opts = {k: opt.pop(k) for k in ("accumulate_steps", "skip_nonfinite",
                                       "skip_grad_norm_above")}
  assert step_opts == {"accumulate_steps": 1, "skip_nonfinite": False,
                       "skip_grad_norm_above": 0.0}
  assert opt == optim.DEFAULT_ADAMW
  assert c.ema_decay == bench_step.EMA_DECAY
  assert ObjectiveConfig.from_config(c) == ObjectiveConfig()
  ours = DiTConfig.variant("XL")
  theirs = DiTConfig.from_config(c)
  compute = {"dtype", "scan_blocks", "remat_policy", "attention_impl", "param_dtype"}
  for f in dc.fields(DiTConfig):
    if f.name not in compute:
      assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
