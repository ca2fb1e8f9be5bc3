"""Reference PyTorch SFD vs sfd_jax on one machine, interleaved: train step or sampling.

  python -m bench.reference_side_by_side --reference /path/to/SFD \\
      [--torch-python /path/to/venv-with-torch/bin/python] \\
      [--mode train|sample] [--size tiny|S1|B1] [--steps 50] [--scale 1.5]

Both models have the same architecture (SFD flags on: QK-RMSNorm, SwiGLU, 2-D RoPE,
RMSNorm, two timestep embedders with Δt = 0.3, 32 texture + 16 semantic channels on a
16×16 latent grid, patch 1). ``--size``: ``tiny`` (width 256, depth 4, 4 heads), ``S1``
(LightningDiT-S/1: 384, 12, 6) or ``B1`` (LightningDiT-B/1: 768, 12, 12) — the reference's
``LightningDiT_S_1`` / ``LightningDiT_B_1`` widths and depths, kept on the small latent
so that a CPU can run them.

``--mode train``: per call, the reference runs its ``transport.training_losses`` (velocity
+ cosine + REPA terms summed as its trainer does) on its ``LightningDiT`` (with the
checkout's ``torch.compile`` decorators), backward, AdamW (β = 0.9/0.999, no weight
decay) and an EMA update of every parameter; sfd_jax runs its jitted
``sfd_jax.training.sfd`` step (same terms, AdamW, EMA).

``--mode sample``: per call, ``--batch`` images by fixed-grid Euler over ``--steps`` grid
points (NFE = steps − 1) with classifier-free guidance (``--scale``). The reference goes
through its own code path: ``Sampler.sample_ode_semantic_first(sampling_method="euler")``
(torchdiffeq) on ``model.forward_with_cfg`` with the doubled batch ``[z, z]`` and labels
``[y, 1000]``, under ``torch.set_grad_enabled(False)`` and ``model.eval()`` as its
``inference.py``; sfd_jax runs ``samplers.sample(method="euler")`` with
``guidance.make_guided_velocity(mode="cfg")`` as one jitted program. No REPA head on
either side in this mode (the reference's forward would otherwise also run its projector).
The zero-initialised layers (adaLN, final linear) are drawn at random on both sides so
that the velocity is not identically zero.

Timing is interleaved: the torch side runs in a long-lived worker process
(``--torch-python``, so the two stacks need not share an environment) that performs one
call whenever the parent asks; the parent alternates reference call, sfd_jax call,
reference call, … after ``--warmup`` untimed calls of each, so both sides see the same
machine load. Each side times its own calls (wall clock, results waited for; and process
CPU time). The report gives medians and minima of both and their ratios (reference /
sfd_jax: > 1 means sfd_jax is faster), plus the median of the per-pair ratios. Results:
``--out`` (default bench/results/) as ``reference_side_by_side_<mode>_<size>_<tag>.json``
and ``.md``.

Without a checkout or without torch the script exits with status 2 and says what is
missing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Shared by every size: 16×16×48 latents, SFD's two clocks, REPA head (train mode).
BASE = {"input_size": 16, "patch_size": 1, "in_channels": 48, "semantic_chans": 16,
        "delta_t": 0.3, "repa_depth": 2, "repa_dim": 768, "repa_projector_dim": 2048,
        "class_dropout_prob": 0.1, "num_classes": 1000}
# size -> (depth, hidden_size, num_heads); S1 and B1 as the reference's LightningDiT_S_1 /
# LightningDiT_B_1.
SIZES = {"tiny": (4, 256, 4), "S1": (12, 384, 6), "B1": (12, 768, 12)}
MODES = ("train", "sample")
MISSING = 2   # exit status when the reference or torch is unavailable


def model_config(size: str) -> dict:
  depth, hidden, heads = SIZES[size]
  return {**BASE, "depth": depth, "hidden_size": hidden, "num_heads": heads}


# ----------------------------------------------------------------------------------
# Reference side (runs in the torch interpreter)
# ----------------------------------------------------------------------------------


def _torch_setup(reference: str, mode: str, size: str, batch: int, device: str,
                 threads: int, steps: int, scale: float):
  """Builds the reference model and returns (one-call function, info dict)."""
  import torch  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, reference)
  from models.lightningdit import LightningDiT  # pylint: disable=import-outside-toplevel
  from transport import Sampler, create_transport  # pylint: disable=import-outside-toplevel

  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  c = model_config(size)
  use_repa = mode == "train"
  model = LightningDiT(
      input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
      hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
      class_dropout_prob=c["class_dropout_prob"], num_classes=c["num_classes"],
      use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True,
      use_repa=use_repa, repa_dino_version="dinov2_vitb14_reg", repa_depth=c["repa_depth"],
      repa_projector_dim=c["repa_projector_dim"], semantic_chans=c["semantic_chans"],
      semfirst_delta_t=c["delta_t"]).to(device)
  transport = create_transport("Linear", "velocity", None, None, None,
                               use_cosine_loss=True, use_lognorm=True, semantic_weight=2.0,
                               semantic_chans=c["semantic_chans"],
                               semfirst_delta_t=c["delta_t"], repa_weight=1.0, repa_mode="cos")
  g = c["input_size"]
  x = torch.randn(batch, c["in_channels"], g, g, device=device)
  y = torch.randint(0, c["num_classes"], (batch,), device=device)
  n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  if mode == "train":
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0)
    feats = torch.randn(batch, c["repa_dim"], g, g, device=device)
    model.train()

    def call():
      terms = transport.training_losses(model, x, {"y": y}, use_repa=True, feature_dino=feats)
      loss = terms["loss"].mean() + terms["cos_loss"].mean() + terms["repa_loss"].mean()
      opt.zero_grad()
      loss.backward()
      opt.step()
      with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
          e.mul_(0.9999).add_(p.detach(), alpha=1e-4)
      sync()
      return float(loss.detach())
  else:
    with torch.no_grad():
      for p in model.parameters():
        if not bool(p.any()):
          p.normal_(0.0, 0.02)
    model.eval()
    torch.set_grad_enabled(False)
    sample_fn = Sampler(transport).sample_ode_semantic_first(
        sampling_method="euler", num_steps=steps, atol=1e-6, rtol=1e-3, reverse=False,
        timestep_shift=0.0, semfirst_delta_t=c["delta_t"], semantic_chans=c["semantic_chans"])
    z2 = torch.cat([x, x], 0)
    y2 = torch.cat([y, torch.full_like(y, c["num_classes"])], 0)

    def call():
      out = sample_fn(z2, model.forward_with_cfg, y=y2, cfg_scale=scale, cfg_interval=False,
                      cfg_interval_start=0.0)[-1][:batch]
      sync()
      return float(out.float().abs().mean())

  info = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
          "params": n_params}
  return call, info


def _torch_worker(args) -> None:
  """Line protocol on stdin/stdout: prints the info dict, then one JSON line
  {"t": wall seconds, "cpu": process CPU seconds, "value": float} per "call" line read;
  stops at EOF or "quit"."""
  out = sys.stdout
  sys.stdout = sys.stderr   # anything the reference prints must not reach the protocol
  call, info = _torch_setup(args.reference, args.mode, args.size, args.batch, args.device,
                            args.threads, args.steps, args.scale)
  print(json.dumps(info), file=out, flush=True)
  for line in sys.stdin:
    if line.strip() != "call":
      break
    print(json.dumps(_timed(call)), file=out, flush=True)


class _TorchProcess:
  """The parent's handle on the worker."""

  def __init__(self, cmd, cwd):
    self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      status = self.proc.wait()
      sys.exit(f"reference_side_by_side: the reference worker stopped (status {status}); "
               "its error output is above.")
    return json.loads(line)

  def call(self) -> dict:
    self.proc.stdin.write("call\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------------
# sfd_jax side
# ----------------------------------------------------------------------------------


def _jax_dit_config(c: dict, use_repa: bool):
  from sfd_jax.models.lightning_dit import DiTConfig  # pylint: disable=import-outside-toplevel
  keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
          "semantic_chans", "delta_t", "repa_depth", "repa_dim", "repa_projector_dim",
          "class_dropout_prob", "num_classes")
  return DiTConfig(**{k: c[k] for k in keys}, use_repa=use_repa, dtype="float32",
                   scan_blocks=False)


def _jax_train(size: str, batch: int):
  """Returns (one blocking train step -> loss, info)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import common as config_common  # pylint: disable=import-outside-toplevel
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.objective import ObjectiveConfig  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import optim  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as ts  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel

  from bench.train_step import random_batch  # pylint: disable=import-outside-toplevel

  c = model_config(size)
  cfg = _jax_dit_config(c, use_repa=True)
  obj = ObjectiveConfig(delta_t=c["delta_t"], semantic_chans=c["semantic_chans"])
  tx, schedule = optim.make_optimizer(config_common.base_config("B").optimizer)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = ts.build_setup(cfg, obj, mesh, tx, schedule, ema_decay=0.9999, seed=0)
  box = {"state": state_lib.create_train_state(setup)}
  step = ts.make_train_step(setup)
  batch_arrays = random_batch(setup, batch)

  def call():
    box["state"], metrics = step(box["state"], batch_arrays)
    return float(metrics["loss"])   # waits for the step

  n_params = sum(int(v.size) for v in jax.tree.leaves(box["state"]["params"]))
  return call, {"params": n_params, "backend": jax.default_backend()}


def _jax_sample(size: str, batch: int, steps: int, scale: float):
  """Returns (one blocking Euler + CFG sampling call -> mean |x|, info)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from sfd_jax.core import jit as jit_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion import guidance as guidance_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel
  from sfd_jax.models import layers as L  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import LightningDiT  # pylint: disable=import-outside-toplevel

  c = model_config(size)
  cfg = _jax_dit_config(c, use_repa=False)
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  gdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [0.02 * jax.random.normal(k, a.shape, a.dtype) if not bool(jnp.any(a)) else a
            for k, a in zip(keys, leaves)]
  state = jax.tree.unflatten(treedef, leaves)

  def run(state, z, y):
    fn = guidance_lib.make_guided_velocity(nnx.merge(gdef, state), mode="cfg", scale=scale)
    out = samplers.sample(fn, z, y, method="euler", num_steps=steps, delta_t=cfg.delta_t,
                          semantic_chans=cfg.semantic_chans)
    return jnp.mean(jnp.abs(out.x))

  g = cfg.input_size
  z = jax.random.normal(jax.random.key(2), (batch, g, g, cfg.in_channels))
  y = jax.random.randint(jax.random.key(3), (batch,), 0, cfg.num_classes)
  # The XLA options the sample job uses (on CPU: Eigen dots; sfd_jax.core.jit).
  options = dict(jit_lib.inference_options())
  compiled = jax.jit(run).lower(state, z, y).compile(compiler_options=options or None)

  def call():
    return float(compiled(state, z, y))   # waits for the result

  return call, {"params": L.param_count(model), "backend": jax.default_backend(),
                "compiler_options": options}


# ----------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------


def _check_reference(args) -> str:
  if not args.reference:
    print("reference_side_by_side: no --reference given. Pass a checkout of the reference "
          "PyTorch SFD code (github.com/yuemingPAN/SFD) with --reference PATH.",
          file=sys.stderr)
    sys.exit(MISSING)
  ref = os.path.abspath(args.reference)
  for rel in ("models/lightningdit.py", "transport/__init__.py"):
    if not os.path.exists(os.path.join(ref, rel)):
      print(f"reference_side_by_side: {ref} is not a checkout of the reference SFD code "
            f"({rel} is missing).", file=sys.stderr)
      sys.exit(MISSING)
  probe = subprocess.run(
      [args.torch_python, "-c", "import torch, timm, einops, scipy, torchdiffeq"],
      capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    print(f"reference_side_by_side: {args.torch_python} cannot import the reference's "
          f"dependencies (torch, timm, einops, scipy, torchdiffeq): {last}. Install them in "
          "a separate environment and pass its interpreter with --torch-python.",
          file=sys.stderr)
    sys.exit(MISSING)
  return ref


def interleave(ref_call, jax_call, *, warmup: int, iters: int, log=print):
  """Warm-up calls of each side, then ref, jax, ref, jax, …; returns
  ``{"ref": {"t": [...], "cpu": [...]}, "jax": {...}}`` (wall and process CPU seconds)."""
  for i in range(warmup):
    log(f"warm-up {i + 1}/{warmup}: reference {ref_call()['t']:.3f} s, "
        f"sfd_jax {_timed(jax_call)['t']:.3f} s")
  out = {"ref": {"t": [], "cpu": []}, "jax": {"t": [], "cpu": []}}
  for i in range(iters):
    for side, res in (("ref", ref_call()), ("jax", _timed(jax_call))):
      out[side]["t"].append(res["t"])
      out[side]["cpu"].append(res["cpu"])
    log(f"pair {i + 1}/{iters}: reference {out['ref']['t'][-1]:.3f} s "
        f"(cpu {out['ref']['cpu'][-1]:.3f}), sfd_jax {out['jax']['t'][-1]:.3f} s "
        f"(cpu {out['jax']['cpu'][-1]:.3f})")
  return out


def _timed(fn) -> dict:
  """One call of ``fn``: wall and process CPU seconds, and what it returned."""
  c0, t0 = time.process_time(), time.perf_counter()
  value = fn()
  return {"t": time.perf_counter() - t0, "cpu": time.process_time() - c0, "value": value}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", default=None,
                      help="checkout of the reference PyTorch SFD code (yuemingPAN/SFD)")
  parser.add_argument("--torch-python", default=sys.executable,
                      help="Python interpreter that has torch (default: this one)")
  parser.add_argument("--mode", default="train", choices=MODES)
  parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
  parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch intra-op threads (0: torch's default)")
  parser.add_argument("--batch", type=int, default=8, help="images per call")
  parser.add_argument("--steps", type=int, default=50,
                      help="sample mode: Euler grid points (NFE = steps - 1)")
  parser.add_argument("--scale", type=float, default=1.5, help="sample mode: CFG scale")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10, help="timed (reference, sfd_jax) pairs")
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  from bench import common  # pylint: disable=import-outside-toplevel
  common.add_output_args(parser)
  args = parser.parse_args(argv)

  if args.torch_worker:
    _torch_worker(args)
    return
  if args.mode == "sample" and args.steps < 2:
    parser.error("--steps counts grid points and must be >= 2")
  ref = _check_reference(args)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [args.torch_python, "-m", "bench.reference_side_by_side", "--torch-worker",
         "--reference", ref, "--mode", args.mode, "--size", args.size,
         "--batch", str(args.batch), "--steps", str(args.steps), "--scale", str(args.scale),
         "--device", args.device, "--threads", str(args.threads)]
  common.log(f"{args.mode} / {args.size}: building the reference (PyTorch) side")
  torch_proc = _TorchProcess(cmd, here)
  try:
    common.log(f"{args.mode} / {args.size}: building the sfd_jax side")
    if args.mode == "train":
      jax_call, jax_info = _jax_train(args.size, args.batch)
    else:
      jax_call, jax_info = _jax_sample(args.size, args.batch, args.steps, args.scale)
    timing = interleave(torch_proc.call, jax_call, warmup=args.warmup, iters=args.iters,
                        log=common.log)
  finally:
    torch_proc.close()
  torch_info = torch_proc.info

  def stats(times):
    return {"median_s": statistics.median(times), "min_s": min(times)}

  t_ref, t_jax = timing["ref"]["t"], timing["jax"]["t"]
  c_ref, c_jax = timing["ref"]["cpu"], timing["jax"]["cpu"]
  s_ref, s_jax = stats(t_ref), stats(t_jax)
  cpu_ratio = statistics.median(c_ref) / statistics.median(c_jax)
  ratio = s_ref["median_s"] / s_jax["median_s"]
  ratio_min = s_ref["min_s"] / s_jax["min_s"]
  pair_ratio = statistics.median(r / j for r, j in zip(t_ref, t_jax))
  unit = "step" if args.mode == "train" else "call"
  rows = [
      {"impl": f"reference PyTorch {torch_info['torch']} ({torch_info['device']}, "
               f"{torch_info['threads']} threads)", "params": torch_info["params"],
       "ms": s_ref["median_s"] * 1e3, "ms_min": s_ref["min_s"] * 1e3,
       "images_per_s": args.batch / s_ref["median_s"],
       "cpu_ms": statistics.median(c_ref) * 1e3, "times_s": t_ref, "cpu_s": c_ref},
      {"impl": f"sfd_jax ({jax_info['backend']})", "params": jax_info["params"],
       "ms": s_jax["median_s"] * 1e3, "ms_min": s_jax["min_s"] * 1e3,
       "images_per_s": args.batch / s_jax["median_s"],
       "cpu_ms": statistics.median(c_jax) * 1e3, "times_s": t_jax, "cpu_s": c_jax},
  ]
  columns = [("impl", "implementation", None), ("params", "trainable params", ",d"),
             ("ms", f"{unit} ms (median)", ".1f"), ("ms_min", "min ms", ".1f"),
             ("images_per_s", "img/s (median)", ".2f"),
             ("cpu_ms", "process CPU ms (median)", ".1f")]
  what = ("train step (loss + cos + REPA, backward, AdamW, EMA)" if args.mode == "train"
          else f"Euler {args.steps} grid points + CFG {args.scale}")
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  env = common.env_info(args.machine)
  tag = args.tag or env["device_kind"]
  common.write_report(
      "reference_side_by_side",
      f"Reference PyTorch vs sfd_jax, {what}, size {args.size}, batch {args.batch}", rows,
      columns, env=env,
      settings={**{k: v for k, v in vars(args).items() if k != "torch_worker"},
                "model": model_config(args.size), "ratio_median": ratio,
                "ratio_min": ratio_min, "ratio_pairs_median": pair_ratio,
                "ratio_cpu_median": cpu_ratio,
                "jax_compiler_options": jax_info.get("compiler_options", {}),
                "loadavg_end": load},
      out_dir=args.out, tag=f"{args.mode}_{args.size}_{tag}",
      notes=[f"Ratio reference / sfd_jax {unit} time: {ratio:.2f} on medians, "
             f"{ratio_min:.2f} on minima, {pair_ratio:.2f} median of the {args.iters} "
             "interleaved pairs (> 1: sfd_jax faster); process CPU time ratio "
             f"{cpu_ratio:.2f} (less sensitive to other jobs on the machine, but it also "
             "counts threads that spin while waiting).",
             f"Model {model_config(args.size)}; float32; {args.warmup} warm-up calls of each "
             f"side, then {args.iters} interleaved pairs. Load average at the end: {load}.",
             f"sfd_jax XLA compiler options: {jax_info.get('compiler_options') or 'none'}."])


if __name__ == "__main__":
  main()
