"""Sampling throughput and NFE per solver, with and without guidance.

  python -m bench.sampling --variant XL --guide-variant B --batch 16 \\
      --runs euler:250:none,euler:250:autoguidance,heun:125:none,dopri5::none

Each run ``METHOD[:STEPS[:GUIDANCE]]`` (method: euler | heun | dopri5 | meanflow; STEPS =
grid points of the fixed-grid solvers, jumps of ``meanflow`` (the few-step sampler of an
average-velocity model, docs/fewstep.md; e.g. ``meanflow:1:cfg``); guidance: none | cfg |
autoguidance, scale
``--scale``) integrates the semantic-first ODE with ``sfd_jax.diffusion.samplers.sample``
and a velocity from ``sfd_jax.diffusion.guidance.make_guided_velocity``, jitted as one
program (weights passed as arguments, not baked in). It reports the compile time, then
the median wall time of ``--repeats`` calls after ``--warmup`` calls (each ended by
``block_until_ready``), images/s, the NFE the solver returned, time per NFE, and model
TFLOP/s (NFE × the analytic forward of bench/flops.py without the REPA head; CFG
evaluates the main model on a doubled batch, autoguidance adds one guide forward).

Weights: random by default, with the zero-initialised layers (adaLN, final Linear)
drawn at random too so that the velocity is not identically zero; the adaptive
dopri5's NFE of such a network says nothing about the NFE with trained weights. Pass
``--params`` / ``--guide-params`` (converted checkpoints, ``sfd_jax.convert``) for that.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from bench import common
from bench.flops import forward_flops

METHODS = ("euler", "heun", "dopri5", "meanflow")
GUIDANCE = ("none", "cfg", "autoguidance")


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  method: str
  steps: int = 250
  guidance: str = "none"

  @classmethod
  def parse(cls, text: str) -> "SampleSpec":
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
      raise ValueError(f"run {text!r}: expected METHOD[:STEPS[:GUIDANCE]]")
    method = parts[0]
    steps = int(parts[1]) if len(parts) > 1 and parts[1] else 250
    guidance = parts[2] if len(parts) > 2 else "none"
    if method not in METHODS:
      raise ValueError(f"run {text!r}: method {method!r} not in {METHODS}")
    if guidance not in GUIDANCE:
      raise ValueError(f"run {text!r}: guidance {guidance!r} not in {GUIDANCE}")
    return cls(method, steps, guidance)

  @property
  def name(self) -> str:
    steps = "" if self.method == "dopri5" else str(self.steps)
    return f"{self.method}:{steps}:{self.guidance}"


def make_model(variant: str, *, dtype: str, seed: int, params_dir: str | None = None,
               interval: bool = False):
  """A LightningDiT with converted weights, or random weights whose zero-initialised
  layers are randomised too (so the velocity field is not identically zero);
  ``interval``: an average-velocity model (interval embedders, method ``meanflow``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import sfd_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT  # pylint: disable=import-outside-toplevel

  cfg = DiTConfig.variant(variant, dtype=dtype, scan_blocks=True, use_repa=False,
                          interval_embedding=interval)
  model = LightningDiT(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  if params_dir:
    from sfd_jax.convert.common import load_params  # pylint: disable=import-outside-toplevel
    loaded, _ = load_params(params_dir)
    loaded.pop("repa_projector", None)
    nnx.replace_by_pure_dict(state, loaded)
  else:
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.02 * jax.random.normal(k, a.shape, a.dtype) if not bool(jnp.any(a)) else a
              for k, a in zip(keys, leaves)]
    state = jax.tree.unflatten(treedef, leaves)
  nnx.update(model, state)
  return model


def evals_flops(spec: SampleSpec, main_cfg, guide_cfg) -> float:
  """Model FLOPs per image of one velocity evaluation under ``spec.guidance``."""
  main = forward_flops(main_cfg, repa=False).total
  if spec.guidance == "cfg":
    return 2 * main
  if spec.guidance == "autoguidance":
    return main + forward_flops(guide_cfg, repa=False).total
  return main


def bench_one(spec: SampleSpec, model, guide, args, env) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from sfd_jax.diffusion import guidance as guidance_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel

  cfg = model.cfg
  gdef, state = nnx.split(model)
  guide_def, guide_state = nnx.split(guide) if guide is not None else (None, None)
  mode = spec.guidance

  def run(state, guide_state, z, y):
    main = nnx.merge(gdef, state)
    weak = nnx.merge(guide_def, guide_state) if mode == "autoguidance" else None
    make = (guidance_lib.make_guided_average_velocity if spec.method == "meanflow" else
            guidance_lib.make_guided_velocity)
    fn = make(main, weak, mode=mode, scale=args.scale)
    out = samplers.sample(fn, z, y, method=spec.method, num_steps=spec.steps,
                          delta_t=cfg.delta_t, semantic_chans=cfg.semantic_chans,
                          atol=args.atol, rtol=args.rtol, max_steps=args.max_steps)
    return out.x, out.nfe

  g = cfg.input_size
  z = jax.random.normal(jax.random.key(args.seed), (args.batch, g, g, cfg.in_channels))
  y = jax.random.randint(jax.random.key(args.seed + 1), (args.batch,), 0, cfg.num_classes)
  gs = guide_state if mode == "autoguidance" else None
  common.log(f"{spec.name}: compiling")
  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(state, gs, z, y).compile()
  compile_s = time.perf_counter() - t0
  times = common.timed(lambda: compiled(state, gs, z, y), warmup=args.warmup,
                       iters=args.repeats)
  x, nfe = compiled(state, gs, z, y)
  nfe = int(nfe)
  finite = bool(jnp.all(jnp.isfinite(x)))
  stats = common.summarize(times)
  img_s = args.batch / stats["median_s"]
  flop_img = nfe * evals_flops(spec, cfg, guide.cfg if guide is not None else None)
  tflops = flop_img * img_s / 1e12
  peak = env["peak_bf16_tflops_per_device"]
  common.log(f"{spec.name}: NFE {nfe}, {stats['median_s']:.2f} s/batch, {img_s:.2f} img/s")
  return {"run": spec.name, "method": spec.method,
          "steps": spec.steps if spec.method != "dopri5" else None,
          "guidance": mode, "scale": args.scale if mode != "none" else None,
          "batch": args.batch, "nfe": nfe, "compile_s": compile_s,
          "batch_s": stats["median_s"], "images_per_s": img_s,
          "ms_per_nfe": stats["median_s"] / max(nfe, 1) * 1e3,
          "tflop_per_image": flop_img / 1e12, "achieved_tflops": tflops,
          "mfu_vs_bf16_peak": tflops / peak if peak else None, "finite": finite,
          "timed_calls": stats["n"]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="XL")
  parser.add_argument("--guide-variant", default="B", help="autoguidance guide model")
  parser.add_argument("--runs", default="euler:250:none,euler:250:autoguidance,"
                      "heun:125:none,dopri5::none",
                      help="comma-separated METHOD[:STEPS[:GUIDANCE]] (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--dtype", default="float32",
                      help="compute dtype (the reference samples in float32)")
  parser.add_argument("--scale", type=float, default=1.5, help="guidance scale")
  parser.add_argument("--atol", type=float, default=1e-6)
  parser.add_argument("--rtol", type=float, default=1e-3)
  parser.add_argument("--max-steps", type=int, default=4096, help="dopri5 step cap")
  parser.add_argument("--params", default=None, help="converted main-model checkpoint dir")
  parser.add_argument("--guide-params", default=None, help="converted guide checkpoint dir")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  common.add_output_args(parser)
  args = parser.parse_args(argv)
  specs = [SampleSpec.parse(r) for r in common.parse_list(args.runs)]

  env = common.env_info(args.machine)
  common.log(f"building {args.variant} (and guide {args.guide_variant}) with "
             f"{'converted' if args.params else 'random'} weights")
  interval = any(s.method == "meanflow" for s in specs)   # one model serves every run
  model = make_model(args.variant, dtype=args.dtype, seed=args.seed, params_dir=args.params,
                     interval=interval)
  guide = None
  if any(s.guidance == "autoguidance" for s in specs):
    guide = make_model(args.guide_variant, dtype=args.dtype, seed=args.seed + 7,
                       params_dir=args.guide_params, interval=interval)
  columns = [("run", "method:steps:guidance", None), ("nfe", "NFE", None),
             ("batch", "batch", None), ("batch_s", "s/batch", ".2f"),
             ("images_per_s", "img/s", ".2f"), ("ms_per_nfe", "ms/NFE", ".1f"),
             ("achieved_tflops", "TFLOP/s", ".1f"), ("mfu_vs_bf16_peak", "of bf16 peak", ".3f"),
             ("compile_s", "compile s", ".0f")]
  weights = "converted checkpoints" if args.params else "random weights"
  notes = [f"{weights}; batch {args.batch}; guidance scale {args.scale}; dopri5 rtol "
           f"{args.rtol} atol {args.atol}; {args.warmup} warm-up + {args.repeats} timed "
           "calls after compilation.",
           "NFE = velocity evaluations (a guided evaluation runs two model forwards: CFG "
           "on a doubled batch, autoguidance main + guide). With random weights the "
           "adaptive dopri5's NFE is not that of a trained model.",
           "TFLOP/s: NFE × analytic forward (no REPA head) per image; "
           "'of bf16 peak' compares with the dense bf16 peak even for float32 runs."]
  rows = []
  for spec in specs:
    rows.append(bench_one(spec, model, guide, args, env))
    # Rewritten after every run, so a run cut short still leaves the finished rows.
    common.write_report(
        "sampling", f"Sampling throughput, {args.variant}/1 (guide {args.guide_variant}), "
        f"{args.dtype}", rows, columns, env=env, settings=vars(args), out_dir=args.out,
        tag=args.tag, notes=notes)

if __name__ == "__main__":
  main()
