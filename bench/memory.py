"""Per-device memory of the compiled train step at scale, on fake CPU devices.

  python -m bench.memory --variants XL,XXL --remat none,dots_no_batch,full \\
      --global-batch 256 --mesh data=1,fsdp=8,tensor=1

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N = the mesh size) before
jax starts, builds the real sharded train setup (``sfd_jax.training.sfd``) and lowers and
compiles the step with *abstract* inputs (``setup.abstract_state`` and ShapeDtypeStructs
for the batch): nothing is allocated or executed. ``compiled.memory_analysis()`` gives
the per-device sizes of the SPMD program: arguments (state shard + batch shard),
outputs, aliased (donated state), temporaries (activations, gradients, optimizer
scratch). Live total = arguments + outputs − aliased + temporaries; the table says
whether that fits 16 GiB (TPU v5e class) and 80 GiB (H100 class) devices.

``--activations model,batch`` compiles each setting twice: ``model`` is the model as it
is; ``batch`` is a diagnostic that wraps every block (for this process only) in
``with_sharding_constraint(x, P(("data", "fsdp")))`` on its input and output, i.e. it
pins the hidden states to the batch sharding the way MaxText-style models do. Without
such constraints XLA's sharding propagation follows the FSDP-sharded weights and shards
activations along the hidden dimension with the *full* global batch on every device
(seen in the compiled HLO: ``f32[256,256,12,64]`` per device at fsdp=8), which is what
the large ``model`` numbers show.

Caveat: this is the *CPU* compiler's buffer assignment. The TPU/GPU compilers fuse
differently (and the CPU backend computes bf16 matmuls through f32 conversions), so
treat the temporaries as an estimate of the right order, not the exact on-chip figure;
the state share (arguments) is exact.

``--fast-compile`` (default on) adds ``--xla_backend_optimization_level=0``: LLVM
code generation is the slow part of a CPU compile and does not change buffer assignment.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

from bench import common

CAPACITIES_GIB = (16, 80)


def _set_xla_flags(devices: int, fast: bool) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags += f" --xla_force_host_platform_device_count={devices}"
  if fast and "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


ACTIVATIONS = ("model", "batch")


@contextlib.contextmanager
def batch_sharded_blocks(mesh):
  """Temporarily pins every LightningDiT block's input and output to the batch sharding
  (a diagnostic of the fix; restores the class afterwards)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel
  from sfd_jax.models import lightning_dit  # pylint: disable=import-outside-toplevel

  sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
  original = lightning_dit.Block.__call__

  def constrained(self, x, c, rope, attention_sharding=None):
    x = jax.lax.with_sharding_constraint(x, sharding)
    return jax.lax.with_sharding_constraint(original(self, x, c, rope, attention_sharding),
                                            sharding)

  lightning_dit.Block.__call__ = constrained
  try:
    yield
  finally:
    lightning_dit.Block.__call__ = original


def state_bytes_per_device(abstract_state) -> dict[str, float]:
  """Exact per-device bytes of params / ema / opt_state under their shardings."""
  import jax  # pylint: disable=import-outside-toplevel

  def size(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
      shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
      total += math.prod(shape) * leaf.dtype.itemsize
    return total

  return {k: size(abstract_state[k]) for k in ("params", "ema", "opt_state")}


def _one(variant: str, remat: str, activations: str, args, mesh_shape, devices) -> dict:
  """Compiles one setting with abstract inputs; returns its row."""
  from bench import train_step as tsb  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as ts  # pylint: disable=import-outside-toplevel

  n_dev = len(devices)
  setup = tsb.build_setup(tsb.RunSpec(variant, remat), dtype=args.dtype, scan=args.scan,
                          mesh_shape=mesh_shape, devices=devices)
  common.log(f"{variant} remat={remat} activations={activations}: compiling "
             f"(abstract inputs, {n_dev} devices)")
  ctx = batch_sharded_blocks(setup.mesh) if activations == "batch" else contextlib.nullcontext()
  t0 = time.perf_counter()
  with ctx:
    compiled = ts.make_train_step(setup).lower(
        setup.abstract_state, tsb.abstract_batch(setup, args.global_batch)).compile()
  compile_s = time.perf_counter() - t0
  gib = {k: v / 2**30 for k, v in tsb.memory_bytes(compiled).items()}
  state = state_bytes_per_device(setup.abstract_state)
  row = {"variant": variant, "remat": remat, "activations": activations,
         "per_device_batch": args.global_batch // n_dev,
         "state_gib": sum(state.values()) / 2**30, "argument_gib": gib["argument"],
         "output_gib": gib["output"], "alias_gib": gib["alias"], "temp_gib": gib["temp"],
         "total_gib": gib["total"], "compile_s": compile_s}
  for cap in CAPACITIES_GIB:
    row[f"fits_{cap}"] = "yes" if gib["total"] <= cap else "no"
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="XL,XXL")
  parser.add_argument("--remat", default="none,dots_no_batch,full",
                      help="remat policies (default: %(default)s)")
  parser.add_argument("--global-batch", type=int, default=256)
  parser.add_argument("--mesh", default="data=1,fsdp=8,tensor=1",
                      help="mesh axes; its size = number of fake CPU devices")
  parser.add_argument("--activations", default="model,batch",
                      help="model (as is) and/or batch (blocks pinned to the batch sharding, "
                      "a diagnostic); default: %(default)s")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--scan", type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                      default=True)
  parser.add_argument("--fast-compile", type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                      default=True, help="LLVM -O0 for the CPU compile (default: true)")
  common.add_output_args(parser)
  args = parser.parse_args(argv)

  from bench import train_step as tsb  # pylint: disable=import-outside-toplevel
  mesh_shape = tsb.parse_mesh(args.mesh)
  if any(v <= 0 for v in mesh_shape.values()):
    raise ValueError(f"--mesh {args.mesh!r}: give every axis a positive size (no -1), "
                     "the product is the number of fake devices")
  n_dev = math.prod(mesh_shape.values())
  _set_xla_flags(n_dev, args.fast_compile)

  import jax  # pylint: disable=import-outside-toplevel

  if len(jax.devices()) < n_dev:
    raise RuntimeError(f"mesh {mesh_shape} needs {n_dev} devices, jax sees "
                       f"{len(jax.devices())}: XLA_FLAGS was set before this script "
                       "(include --xla_force_host_platform_device_count)")
  devices = jax.devices()[:n_dev]
  env = common.env_info(args.machine)
  rows = []
  activations = common.parse_list(args.activations)
  for a in activations:
    if a not in ACTIVATIONS:
      raise ValueError(f"--activations {a!r} not in {ACTIVATIONS}")

  def report():
    columns = [("variant", "variant", None), ("remat", "remat", None),
               ("activations", "activations", None),
               ("per_device_batch", "batch/dev", None), ("state_gib", "state GiB", ".2f"),
               ("argument_gib", "arguments GiB", ".2f"), ("temp_gib", "temporaries GiB", ".2f"),
               ("total_gib", "live total GiB", ".2f")]
    columns += [(f"fits_{c}", f"fits {c} GiB", None) for c in CAPACITIES_GIB]
    columns += [("compile_s", "compile s", ".0f")]
    common.write_report(
        "memory", f"Per-device memory of the compiled train step (global batch "
        f"{args.global_batch}, mesh {args.mesh})", rows, columns, env=env,
        settings=vars(args), out_dir=args.out, tag=args.tag or f"cpu{n_dev}",
        notes=[f"CPU compiler, {n_dev} fake devices, dtype {args.dtype}, scan {args.scan}; "
               "compile only (abstract inputs).",
               "state = params + EMA + Adam moments (f32, sharded by the config's rules); "
               "arguments add the batch shard; live total = arguments + outputs − aliased "
               "(donated) + temporaries.",
               "Temporaries come from the CPU backend's buffer assignment: an estimate for "
               "TPU/GPU, not the exact figure.",
               "activations 'batch': blocks pinned to the batch sharding by this script "
               "(diagnostic); 'model': the model as it is."])

  for variant in common.parse_list(args.variants):
    for remat in common.parse_list(args.remat):
      for act in activations:
        rows.append(_one(variant, remat, act, args, mesh_shape, devices))
        common.log(f"{variant} remat={remat} activations={act}: {rows[-1]['total_gib']:.2f} "
                   f"GiB per device (temp {rows[-1]['temp_gib']:.2f}), compiled in "
                   f"{rows[-1]['compile_s']:.0f} s")
        report()   # rewritten after every row, so an interrupted run keeps its results


if __name__ == "__main__":
  main()
