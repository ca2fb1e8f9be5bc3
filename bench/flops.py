"""Analytic FLOP count of the LightningDiT forward, checked against XLA's cost analysis.

Counting rules (docs/method.md §16; one multiply-accumulate = 2 FLOP; matrix products only —
norms, RoPE, softmax and other elementwise work are left out):

* per block and token: qkv 2·D·3D + output projection 2·D² + SwiGLU 2·D·2H + 2·H·D
  (= 24·D² for H = 8D/3), plus attention 4·T·D (scores and weighted sum, all heads);
* per block and *image*: the adaLN modulation Linear D→6D (it acts on the condition
  vector, not on tokens); per image once more: the final adaLN (D→2D) and the timestep
  embedders (256→D/2→D/2 twice for the semantic-first model);
* per token once: the patch embedder (p²·C_in→D), the final Linear (D→p²·C_out) and,
  when requested, the REPA projector (D→P→P→R);
* train step = 3 × forward (forward + backward, model FLOPs; recomputation under a
  remat policy is extra hardware work and is not counted, as is usual for MFU).

The counter itself is ``sfd_jax.planning.flops`` (``--mode=plan`` compares it with the
compiled TPU programs); this script re-exports it. ``python -m bench.flops`` prints the
table for B, XL and XXL and, unless ``--no-xla``,
compares each with ``jax.jit(forward).lower(...).compile().cost_analysis()["flops"]`` of
the unrolled float32 forward (compile only, abstract inputs: nothing is allocated).
XLA counts while-loop bodies once, so the check always uses ``scan_blocks=False``.
"""
from __future__ import annotations

import argparse
import dataclasses

from bench import common
from sfd_jax.planning.flops import (TIMESTEP_FREQ_DIM, FlopCount,  # noqa: F401
                                   forward_flops)


def xla_forward_flops(cfg, *, batch: int = 2, repa: bool = True) -> float:
  """XLA's cost-analysis FLOPs per image of the compiled forward (compile only).

  Uses ``cfg`` with float32 compute and unrolled blocks (XLA counts a scanned body once).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import sfd_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from sfd_jax.models.lightning_dit import LightningDiT  # pylint: disable=import-outside-toplevel

  cfg = dataclasses.replace(cfg, dtype="float32", scan_blocks=False, remat_policy="none")
  want_repa = repa and cfg.use_repa
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0))))

  def forward(state, x, t_tex, t_sem, y):
    model = nnx.merge(graphdef, state)
    return model(x, t_tex, t_sem, y, return_repa=want_repa)

  g = cfg.input_size
  args = (state, jax.ShapeDtypeStruct((batch, g, g, cfg.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))
  cost = jax.jit(forward).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"]) / batch


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="B,XL,XXL",
                      help="comma-separated LightningDiT variants (default: %(default)s)")
  parser.add_argument("--no-xla", action="store_true",
                      help="skip the XLA cost-analysis check (analytic numbers only)")
  parser.add_argument("--batch", type=int, default=2, help="batch of the XLA check")
  parser.add_argument("--global-batch", type=int, default=256,
                      help="global batch for the per-step column (default: %(default)s)")
  common.add_output_args(parser)
  args = parser.parse_args(argv)

  import sfd_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from sfd_jax.models.lightning_dit import DiTConfig  # pylint: disable=import-outside-toplevel

  rows = []
  for name in common.parse_list(args.variants):
    cfg = DiTConfig.variant(name)
    count = forward_flops(cfg)
    row = {"variant": name, "depth": cfg.depth, "width": cfg.hidden_size,
           "fwd_gflop": count.total / 1e9,
           "fwd_no_repa_gflop": forward_flops(cfg, repa=False).total / 1e9,
           "blocks_linear_gflop": count.blocks_linear / 1e9,
           "attention_gflop": count.attention / 1e9, "adaln_gflop": count.adaln / 1e9,
           "repa_gflop": count.repa / 1e9,
           "train_gflop_per_image": count.train_step / 1e9,
           "train_tflop_per_step": count.train_step * args.global_batch / 1e12}
    if not args.no_xla:
      common.log(f"compiling the unrolled {name} forward for XLA's cost analysis")
      xla = xla_forward_flops(cfg, batch=args.batch)
      row["xla_fwd_gflop"] = xla / 1e9
      row["xla_over_analytic"] = xla / count.total
    rows.append(row)

  columns = [("variant", "variant", None), ("fwd_gflop", "forward GFLOP/img", ".1f"),
             ("fwd_no_repa_gflop", "fwd w/o REPA", ".1f"),
             ("attention_gflop", "of it attention", ".2f"), ("adaln_gflop", "adaLN", ".3f"),
             ("repa_gflop", "REPA head", ".2f"),
             ("train_gflop_per_image", "train GFLOP/img (3×)", ".1f"),
             ("train_tflop_per_step", f"train TFLOP/step @{args.global_batch}", ".1f")]
  if not args.no_xla:
    columns += [("xla_fwd_gflop", "XLA forward GFLOP/img", ".1f"),
                ("xla_over_analytic", "XLA / analytic", ".4f")]
  env = common.env_info(args.machine)
  common.write_report(
      "flops", "Analytic FLOPs of the LightningDiT forward (per image)", rows, columns,
      env=env, settings=vars(args), out_dir=args.out, tag=args.tag or "analytic",
      notes=["Matrix products only; XLA's count also includes elementwise work "
             "(norms, softmax, RoPE), hence a ratio slightly above 1.",
             "Train = 3 × forward with the REPA head (model FLOPs, no recomputation)."])


if __name__ == "__main__":
  main()
