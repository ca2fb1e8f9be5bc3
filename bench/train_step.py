"""Train-step throughput and MFU of sfd_jax's jitted SFD update.

  python -m bench.train_step --runs B:none,XL:none,XL:dots_no_batch \\
      --per-device-batch 256,128,64 --dtype bfloat16

Each run ``VARIANT[:REMAT[:ATTENTION]][@B1/B2]`` (remat: none | full | dots | dots_no_batch |
save_attn_out; attention: auto | xla | xla_heads | cudnn | splash) builds the real train
state and step (``sfd_jax.training.sfd``: AdamW, EMA, semantic-first loss with cosine and
REPA terms) on a mesh over all local devices (``--mesh``, FSDP by default), then:

1. lowers and compiles the step for the first per-device batch of the run's ``@`` list
   or else ``--per-device-batch`` (largest first); if the compiled program's memory
   (arguments + outputs − aliased + temporaries, ``compiled.memory_analysis()``) exceeds
   the device's memory limit, or running it raises RESOURCE_EXHAUSTED, it moves on to the
   next batch size;
2. runs ``--warmup`` steps, then times ``--iters`` steps one by one, each ended by
   ``block_until_ready`` (synthetic batch held on the devices: no input pipeline);
3. reports the median step time, images/s, achieved model TFLOP/s (3 × the analytic
   forward of bench/flops.py, REPA head included, recomputation not counted) and MFU
   against the dense bf16 peak of the device (none on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time

from bench import common
from bench.flops import forward_flops

EMA_DECAY = 0.9999   # the recipe's (configs/common.py base_config)

REMATS = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ATTENTION = ("auto", "xla", "xla_heads", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """``VARIANT[:REMAT[:ATTENTION]][@B1/B2/...]``; the batch list overrides the default."""
  variant: str
  remat: str = "none"
  attention: str = "auto"
  batches: tuple[int, ...] = ()

  @classmethod
  def parse(cls, text: str) -> "RunSpec":
    head, _, tail = text.partition("@")
    parts = head.split(":")
    if not 1 <= len(parts) <= 3:
      raise ValueError(f"run {text!r}: expected VARIANT[:REMAT[:ATTENTION]][@B1/B2]")
    try:
      batches = tuple(int(b) for b in tail.split("/") if b)
    except ValueError as e:
      raise ValueError(f"run {text!r}: batch sizes after '@' must be integers") from e
    spec = cls(*parts, batches=batches)
    if spec.remat not in REMATS:
      raise ValueError(f"run {text!r}: remat {spec.remat!r} not in {REMATS}")
    if spec.attention not in ATTENTION:
      raise ValueError(f"run {text!r}: attention {spec.attention!r} not in {ATTENTION}")
    return spec

  @property
  def name(self) -> str:
    return f"{self.variant}:{self.remat}:{self.attention}"


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1,tensor=1' -> dict (axes of sfd_jax.parallel.make_mesh)."""
  out = {}
  for item in common.parse_list(text):
    if "=" not in item:
      raise ValueError(f"--mesh item {item!r}: expected axis=size")
    k, v = item.split("=", 1)
    out[k.strip()] = int(v)
  return out


def build_setup(spec: RunSpec, *, dtype: str, scan: bool, mesh_shape: dict[str, int],
                seed: int = 0, devices=None):
  """The reference SFD recipe for ``spec`` on a mesh: TrainSetup.

  The recipe comes from the dataclass defaults (``DiTConfig``, ``ObjectiveConfig``) and
  ``optim.DEFAULT_ADAMW`` — equal to ``configs/common.py``'s (tests/test_bench_flops.py
  checks it) — so the benchmark needs neither ml_collections nor TensorFlow.
  """
  import sfd_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import optim  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as ts  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.objective import ObjectiveConfig  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import DiTConfig  # pylint: disable=import-outside-toplevel

  model_cfg = DiTConfig.variant(
      spec.variant, dtype=dtype, scan_blocks=scan, remat_policy=spec.remat,
      attention_impl=None if spec.attention == "auto" else spec.attention)
  obj_cfg = ObjectiveConfig(semantic_chans=model_cfg.semantic_chans,
                            delta_t=model_cfg.delta_t)
  tx, schedule = optim.make_optimizer(optim.DEFAULT_ADAMW)
  mesh = parallel.make_mesh(mesh_shape, devices)
  return ts.build_setup(model_cfg, obj_cfg, mesh, tx, schedule, rules=parallel.DEFAULT_RULES,
                        ema_decay=EMA_DECAY, seed=seed)


REPA_DTYPE = "float16"   # what the training config feeds (config.data.repa_dtype)


def abstract_batch(setup, global_batch: int, repa_dtype: str = REPA_DTYPE):
  """ShapeDtypeStructs (with the batch sharding) of one training batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel

  cfg = setup.model_cfg
  sh = parallel.batch_sharding(setup.mesh)
  g = cfg.input_size
  return {
      "latent": jax.ShapeDtypeStruct((global_batch, g, g, cfg.in_channels), jnp.float32,
                                     sharding=sh),
      "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sh),
      "repa": jax.ShapeDtypeStruct((global_batch, cfg.num_tokens, cfg.repa_dim),
                                   jnp.dtype(repa_dtype), sharding=sh),
  }


def random_batch(setup, global_batch: int, seed: int = 1, repa_dtype: str = REPA_DTYPE):
  """A synthetic batch created directly on the devices, batch-sharded."""
  import jax  # pylint: disable=import-outside-toplevel

  shapes = abstract_batch(setup, global_batch, repa_dtype)
  cfg = setup.model_cfg

  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"latent": jax.random.normal(k1, shapes["latent"].shape),
            "label": jax.random.randint(k2, shapes["label"].shape, 0, cfg.num_classes),
            "repa": jax.random.normal(k3, shapes["repa"].shape).astype(shapes["repa"].dtype)}

  out_sh = {k: v.sharding for k, v in shapes.items()}
  return jax.jit(make, out_shardings=out_sh)(jax.random.key(seed))


def memory_bytes(compiled) -> dict[str, float]:
  """Per-device bytes of a compiled program: arguments, outputs, aliased, temporaries and
  their live total (arguments + outputs − aliased + temporaries)."""
  m = compiled.memory_analysis()
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
  return {"argument": arg, "output": out, "alias": alias, "temp": temp,
          "total": arg + out - alias + temp}


def device_memory_limit() -> int | None:
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def bench_run(spec: RunSpec, batches: list[int], args, env) -> dict:
  """Finds the largest per-device batch that fits and times it; returns one row."""
  import jax  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as ts  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel

  row = {"run": spec.name, "variant": spec.variant,
         "remat": spec.remat, "attention": spec.attention, "dtype": args.dtype,
         "scan": args.scan, "tried": []}
  setup = build_setup(spec, dtype=args.dtype, scan=args.scan, mesh_shape=args.mesh_shape)
  n_dev = setup.mesh.size
  limit = device_memory_limit()
  flop_img = forward_flops(setup.model_cfg).train_step
  for per_dev in batches:
    gb = per_dev * n_dev
    common.log(f"{row['run']}: compiling for per-device batch {per_dev} (global {gb})")
    step = ts.make_train_step(setup)
    try:
      t0 = time.perf_counter()
      compiled = step.lower(setup.abstract_state, abstract_batch(setup, gb)).compile()
      compile_s = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      row["tried"].append(f"{per_dev}: compile OOM")
      continue
    mem = memory_bytes(compiled)
    if limit is not None and mem["total"] > limit:
      row["tried"].append(f"{per_dev}: needs {mem['total'] / 2**30:.1f} GiB > "
                          f"{limit / 2**30:.1f} GiB")
      common.log(f"{row['run']}: batch {per_dev} does not fit ({row['tried'][-1]})")
      continue
    state = None
    try:
      state = state_lib.create_train_state(setup)
      batch = random_batch(setup, gb)
      box = {"state": state}

      def one_step():
        box["state"], metrics = compiled(box["state"], batch)
        return metrics["loss"]

      times = common.timed(one_step, warmup=args.warmup, iters=args.iters)
      loss = float(jax.device_get(one_step()))
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      row["tried"].append(f"{per_dev}: OOM at run time")
      common.log(f"{row['run']}: batch {per_dev} ran out of memory")
      box = state = batch = None
      gc.collect()
      continue
    stats = common.summarize(times)
    peak_mem = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    img_s = gb / stats["median_s"]
    tflops = flop_img * img_s / 1e12
    peak = env["peak_bf16_tflops_per_device"]
    row.update({
        "per_device_batch": per_dev, "global_batch": gb, "devices": n_dev,
        "compile_s": compile_s, "step_ms": stats["median_s"] * 1e3,
        "step_ms_mean": stats["mean_s"] * 1e3, "step_ms_std": stats["std_s"] * 1e3,
        "images_per_s": img_s, "images_per_s_per_device": img_s / n_dev,
        "model_tflops_per_step": flop_img * gb / 1e12,
        "achieved_tflops_per_device": tflops / n_dev,
        "mfu": (tflops / n_dev / peak) if peak else None,
        "compiled_mem_gib": mem["total"] / 2**30, "compiled_temp_gib": mem["temp"] / 2**30,
        "peak_mem_gib": peak_mem / 2**30 if peak_mem else None, "loss": loss,
        "timed_steps": stats["n"],
    })
    common.log(f"{row['run']}: {stats['median_s'] * 1e3:.1f} ms/step, {img_s:.1f} img/s")
    box = state = batch = compiled = None
    gc.collect()
    return row
  row["error"] = "no per-device batch fits: " + "; ".join(row["tried"])
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default="B:none,XL:none,XL:dots_no_batch",
                      help="comma-separated VARIANT[:REMAT[:ATTENTION]][@B1/B2/...] "
                      "(default: %(default)s)")
  parser.add_argument("--per-device-batch", default="256,128,64",
                      help="per-device batch sizes to try, largest first (default: %(default)s)")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay f32)")
  parser.add_argument("--scan", type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                      default=True, help="lax.scan over blocks (default: true)")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                      help="mesh axes over all local devices (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  common.add_output_args(parser)
  args = parser.parse_args(argv)
  args.mesh_shape = parse_mesh(args.mesh)
  specs = [RunSpec.parse(r) for r in common.parse_list(args.runs)]
  batches = sorted(common.parse_list(args.per_device_batch, int), reverse=True)
  specs = [dataclasses.replace(s, batches=tuple(sorted(s.batches, reverse=True)))
           for s in specs]

  env = common.env_info(args.machine)
  columns = [("run", "variant:remat:attention", None), ("per_device_batch", "batch/dev", None),
             ("step_ms", "step ms (median)", ".1f"), ("images_per_s", "img/s", ".1f"),
             ("images_per_s_per_device", "img/s/dev", ".1f"),
             ("achieved_tflops_per_device", "TFLOP/s/dev", ".1f"), ("mfu", "MFU", ".3f"),
             ("compiled_mem_gib", "compiled GiB", ".1f"), ("peak_mem_gib", "peak GiB", ".1f"),
             ("compile_s", "compile s", ".0f"), ("tried", "skipped", None)]
  notes = [f"dtype {args.dtype}, scan {args.scan}, mesh {args.mesh}; {args.warmup} warm-up "
           f"+ {args.iters} timed steps, each ended by block_until_ready.",
           "TFLOP/s are model FLOPs (3 × analytic forward incl. REPA head, bench/flops.py); "
           "recomputation under remat is not counted. MFU against the dense bf16 peak "
           f"({env['peak_bf16_tflops_per_device']} TFLOP/s per device).",
           "compiled GiB: arguments + outputs − aliased + temporaries of the compiled step; "
           "peak GiB: the allocator's peak since the process started."]
  rows = []
  for spec in specs:
    row = bench_run(spec, list(spec.batches) or batches, args, env)
    row["tried"] = "; ".join(row["tried"]) or "-"
    rows.append(row)
    # Rewritten after every run, so a run cut short still leaves the finished rows.
    common.write_report("train_step", "Train-step throughput (synthetic batch on device)",
                        rows, columns, env=env, settings=vars(args), out_dir=args.out,
                        tag=args.tag, notes=notes)

if __name__ == "__main__":
  main()
