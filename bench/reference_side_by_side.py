"""Same tiny SFD train step in the reference PyTorch code and in sfd_jax, on one machine.

  python -m bench.reference_side_by_side --reference /path/to/SFD \\
      [--torch-python /path/to/venv-with-torch/bin/python]

The reference side imports the checkout's ``models.lightningdit.LightningDiT`` and
``transport.create_transport`` (so it needs torch, timm, einops, scipy and torchdiffeq —
the checkout's own requirements) and runs, per step: the semantic-first training loss
with the cosine and REPA terms summed as the reference trainer does, backward, AdamW
(β = 0.9/0.999, no weight decay) and an EMA update of all parameters. The sfd_jax side
runs ``sfd_jax.training.sfd`` with the same architecture, objective and optimizer. Both
use float32 on the same device type (CPU unless the torch side finds CUDA and
``--device cuda`` is given; JAX uses its default backend) and the same batch size; the
report gives both step times and their ratio (reference / sfd_jax, > 1 means sfd_jax is
faster).

Torch runs in a separate interpreter (``--torch-python``; default: this one) so the two
stacks need not share a virtual environment. Without a checkout or without torch the
script exits with status 2 and says what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The tiny configuration timed on both sides (256 tokens, SFD flags on).
TINY = {"input_size": 16, "patch_size": 1, "in_channels": 48, "hidden_size": 256,
        "depth": 4, "num_heads": 4, "semantic_chans": 16, "delta_t": 0.3,
        "repa_depth": 2, "repa_dim": 768, "repa_projector_dim": 2048,
        "class_dropout_prob": 0.1, "num_classes": 1000}
MISSING = 2   # exit status when the reference or torch is unavailable


def _torch_worker(reference: str, batch: int, warmup: int, iters: int, device: str,
                  threads: int) -> dict:
  """Runs in the torch interpreter: times the reference train step; returns a dict."""
  import torch  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, reference)
  from models.lightningdit import LightningDiT  # pylint: disable=import-outside-toplevel
  from transport import create_transport  # pylint: disable=import-outside-toplevel

  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  c = TINY
  model = LightningDiT(
      input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
      hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
      class_dropout_prob=c["class_dropout_prob"], num_classes=c["num_classes"],
      use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True,
      use_repa=True, repa_dino_version="dinov2_vitb14_reg", repa_depth=c["repa_depth"],
      repa_projector_dim=c["repa_projector_dim"], semantic_chans=c["semantic_chans"],
      semfirst_delta_t=c["delta_t"]).to(device)
  ema = [p.detach().clone() for p in model.parameters()]
  transport = create_transport("Linear", "velocity", None, None, None,
                               use_cosine_loss=True, use_lognorm=True, semantic_weight=2.0,
                               semantic_chans=c["semantic_chans"],
                               semfirst_delta_t=c["delta_t"], repa_weight=1.0, repa_mode="cos")
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0)
  g = c["input_size"]
  x = torch.randn(batch, c["in_channels"], g, g, device=device)
  y = torch.randint(0, c["num_classes"], (batch,), device=device)
  feats = torch.randn(batch, c["repa_dim"], g, g, device=device)
  model.train()

  def step():
    terms = transport.training_losses(model, x, {"y": y}, use_repa=True, feature_dino=feats)
    loss = terms["loss"].mean() + terms["cos_loss"].mean() + terms["repa_loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, model.parameters()):
        e.mul_(0.9999).add_(p.detach(), alpha=1e-4)
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss)

  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  return {"times": times, "loss": loss, "torch": torch.__version__, "device": device,
          "threads": torch.get_num_threads(),
          "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _jax_side(batch: int, warmup: int, iters: int) -> dict:
  """Times sfd_jax's train step on the tiny configuration."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import common as config_common  # pylint: disable=import-outside-toplevel
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import optim  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as ts  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.objective import ObjectiveConfig  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import DiTConfig  # pylint: disable=import-outside-toplevel

  from bench import common  # pylint: disable=import-outside-toplevel
  from bench.train_step import random_batch  # pylint: disable=import-outside-toplevel

  c = TINY
  cfg = DiTConfig(**{k: c[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size",
                                       "depth", "num_heads", "semantic_chans", "delta_t",
                                       "repa_depth", "repa_dim", "repa_projector_dim",
                                       "class_dropout_prob", "num_classes")},
                  dtype="float32", scan_blocks=False)
  obj = ObjectiveConfig(delta_t=c["delta_t"], semantic_chans=c["semantic_chans"])
  base = config_common.base_config("B")
  tx, schedule = optim.make_optimizer(base.optimizer)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = ts.build_setup(cfg, obj, mesh, tx, schedule, ema_decay=0.9999, seed=0)
  state = ts.create_train_state(setup)
  step = ts.make_train_step(setup)
  batch_arrays = random_batch(setup, batch)
  box = {"state": state}

  def one():
    box["state"], metrics = step(box["state"], batch_arrays)
    return metrics["loss"]

  times = common.timed(one, warmup=warmup, iters=iters)
  n_params = sum(int(v.size) for v in jax.tree.leaves(box["state"]["params"]))
  return {"times": times, "loss": float(one()), "params": n_params,
          "backend": jax.default_backend()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", default=None,
                      help="checkout of the reference PyTorch SFD code (yuemingPAN/SFD)")
  parser.add_argument("--torch-python", default=sys.executable,
                      help="Python interpreter that has torch (default: this one)")
  parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch intra-op threads (0: torch's default)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  from bench import common  # pylint: disable=import-outside-toplevel
  common.add_output_args(parser)
  args = parser.parse_args(argv)

  if args.torch_worker:
    print(json.dumps(_torch_worker(args.reference, args.batch, args.warmup, args.iters,
                                   args.device, args.threads)))
    return

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

  common.log("timing the reference (PyTorch) train step")
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [args.torch_python, "-m", "bench.reference_side_by_side", "--torch-worker",
         "--reference", ref, "--batch", str(args.batch), "--warmup", str(args.warmup),
         "--iters", str(args.iters), "--device", args.device, "--threads", str(args.threads)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here, check=False)
  if proc.returncode != 0:
    print(proc.stderr, file=sys.stderr)
    sys.exit(f"reference_side_by_side: the reference train step failed (status "
             f"{proc.returncode}); its error output is above.")
  torch_res = json.loads(proc.stdout.strip().splitlines()[-1])
  common.log("timing the sfd_jax train step")
  jax_res = _jax_side(args.batch, args.warmup, args.iters)

  t_ref = common.summarize(torch_res["times"])
  t_jax = common.summarize(jax_res["times"])
  rows = [
      {"impl": f"reference PyTorch {torch_res['torch']} ({torch_res['device']}, "
               f"{torch_res['threads']} threads)", "params": torch_res["params"],
       "step_ms": t_ref["median_s"] * 1e3, "step_ms_min": t_ref["min_s"] * 1e3,
       "images_per_s": args.batch / t_ref["median_s"], "loss": torch_res["loss"],
       "times_s": torch_res["times"]},
      {"impl": f"sfd_jax ({jax_res['backend']})", "params": jax_res["params"],
       "step_ms": t_jax["median_s"] * 1e3, "step_ms_min": t_jax["min_s"] * 1e3,
       "images_per_s": args.batch / t_jax["median_s"], "loss": jax_res["loss"],
       "times_s": jax_res["times"]},
  ]
  ratio = t_ref["median_s"] / t_jax["median_s"]
  ratio_min = t_ref["min_s"] / t_jax["min_s"]
  columns = [("impl", "implementation", None), ("params", "trainable params", ",d"),
             ("step_ms", "step ms (median)", ".1f"), ("step_ms_min", "min ms", ".1f"),
             ("images_per_s", "img/s", ".1f"), ("loss", "last loss", ".3f")]
  env = common.env_info(args.machine)
  common.write_report(
      "reference_side_by_side", "Reference PyTorch vs sfd_jax, same tiny train step", rows,
      columns, env=env, settings={**vars(args), "tiny": TINY, "ratio": ratio, "ratio_min": ratio_min},
      out_dir=args.out, tag=args.tag,
      notes=[f"Ratio reference / sfd_jax step time: {ratio:.2f} on medians, {ratio_min:.2f} "
             "on the fastest steps (> 1: sfd_jax faster).",
             f"Tiny config {TINY}; batch {args.batch}, float32; {args.warmup} warm-up + "
             f"{args.iters} timed steps. The reference also holds a fixed pos_embed buffer "
             "(not trainable, not counted).",
             "Reference step: loss + cos + REPA terms, backward, AdamW, EMA of every "
             "parameter; sfd_jax: the jitted sfd_jax.training step (same terms, AdamW, EMA, "
             "norms for logging)."])


if __name__ == "__main__":
  main()
