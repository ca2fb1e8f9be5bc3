"""Export: a training run (or a converted folder) → weights for elsewhere.

* A LightningDiT run (``--mode=export``, ``export_run``) or converted folder (the command
  line's ``--src``) → ``export_params``: Orbax in the converted layout, the reference's
  PyTorch state dict as ``.safetensors`` / ``.npz``, in float32, bfloat16 or float16;
* an autoencoder or feature-net run (``export_converted``, the command line's ``--run``)
  → a converted-weights folder (``params/`` + ``meta.json``) that ``--mode=encode``,
  sampling and the metrics read like converted reference weights.

  python -m sfd_jax.checkpoint.export --src ckpt/sfd_xl --dst exports/sfd_xl --formats safetensors
  python -m sfd_jax.checkpoint.export --run runs/tvae --kind texture_vae --dst weights/tvae

What a LightningDiT export writes into ``dst``:

* ``orbax``: ``params/`` + ``meta.json`` exactly as ``sfd_jax.convert.common.save_params``
  writes them, with meta ``{"kind": "lightning_dit", "config": DiTConfig}``, so
  ``sfd_jax.convert.lightning_dit.load_converted(dst)`` (the sampler, ``init_from``) loads it;
* ``safetensors`` / ``npz``: ``lightning_dit.safetensors`` / ``lightning_dit.npz``, a flat state
  dict with the reference PyTorch key names and layouts (``nn.Linear`` weights (out, in),
  the patch embedding as a (D, C, p, p) convolution, one entry per block), including the
  buffers the reference keeps in its state dict (``pos_embed``, ``feat_rope.freqs_cos/sin``)
  recomputed from the config, so ``model.load_state_dict(...)`` of the reference
  ``LightningDiT`` accepts it with ``strict=True``. NumPy has no bfloat16, so a bf16 export
  stores the (bf16-rounded) values as float32 in ``.npz``;
* ``export.json``: what was exported (source, step, weights, dtype, files, config).

The weights are read straight into host memory (NumPy), without a device mesh or the
optimizer state, so an export runs on any single machine (a CPU is enough).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from safetensors.numpy import save_file

from sfd_jax.checkpoint import runs
from sfd_jax.convert import networks
from sfd_jax.convert.common import config_from_json, load_params, save_params
from sfd_jax.convert.lightning_dit import config_to_meta
from sfd_jax.core import errors, runner
from sfd_jax.core.errors import CheckpointError, ConfigError
from sfd_jax.models.lightning_dit import DiTConfig, rope_tables, sincos_pos_embed

FORMATS = ("orbax", "safetensors", "npz")
DTYPES = ("float32", "bfloat16", "float16")
REFERENCE_NAME = "lightning_dit"      # lightning_dit.safetensors / lightning_dit.npz
MANIFEST = "export.json"
# Entries of ``dst`` that an export writes (and that ``overwrite`` may replace).
_OWNED = ("params", "meta.json", MANIFEST, f"{REFERENCE_NAME}.safetensors",
          f"{REFERENCE_NAME}.npz")


class ExportError(ConfigError):
  """Bad export options or a checkpoint that cannot be exported."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  """``config.export``: which step and weights, stored dtype, formats, destination."""
  step: int | None = None             # None = latest
  weights: str = "ema"
  dtype: str = "float32"
  formats: tuple[str, ...] = ("orbax", "safetensors")
  dst: str = ""
  overwrite: bool = False

  def __post_init__(self):
    if self.weights not in runs.WEIGHTS:
      raise ExportError(f"config.export.weights={self.weights!r}; expected one of "
                        f"{runs.WEIGHTS}")
    if self.dtype not in DTYPES:
      raise ExportError(f"config.export.dtype={self.dtype!r}; expected one of {DTYPES}")
    bad = [f for f in self.formats if f not in FORMATS]
    if bad or not self.formats:
      raise ExportError(f"config.export.formats={','.join(self.formats)!r}: unknown "
                        f"{bad or 'empty list'}; expected a comma-separated subset of {FORMATS}")

  @classmethod
  def from_config(cls, config) -> "ExportOptions":
    """Reads ``config.export`` (``step`` < 0 = latest; ``formats`` comma-separated);
    fields it lacks keep the defaults above (those of configs/common.py)."""
    section = config.get("export") if hasattr(config, "get") else None
    given = {} if section is None else dict(
        section.to_dict() if hasattr(section, "to_dict") else section)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ExportError(f"config.export has unknown fields {unknown}; known: {known}")
    if "step" in given:
      given["step"] = None if int(given["step"]) < 0 else int(given["step"])
    if "formats" in given:
      given["formats"] = parse_formats(given["formats"])
    return cls(**given)


def parse_formats(formats) -> tuple[str, ...]:
  """'orbax, safetensors' or a sequence -> ('orbax', 'safetensors') (order kept, no dups)."""
  items = formats.split(",") if isinstance(formats, str) else list(formats)
  out: list[str] = []
  for f in (str(i).strip().lower() for i in items):
    if f and f not in out:
      out.append(f)
  return tuple(out)


# ----------------------------------------------------------------------------------
# sfd_jax parameters -> reference state dict (the inverse of convert_lightning_dit)
# ----------------------------------------------------------------------------------


def reference_buffers(cfg) -> dict[str, np.ndarray]:
  """The non-trainable tensors of the reference state dict, recomputed from the config
  (RoPE tables only when the model uses RoPE)."""
  grid = cfg.input_size // cfg.patch_size
  out = {"pos_embed": sincos_pos_embed(cfg.hidden_size, grid)[None]}
  if cfg.use_rope:
    out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = rope_tables(cfg.head_dim, grid)
  return out


def to_reference_state_dict(params: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
  """Nested ``LightningDiT(cfg)`` parameters -> flat reference (PyTorch) state dict.

  Exactly undoes ``sfd_jax.convert.lightning_dit.convert_lightning_dit``: Dense kernels
  are transposed back to (out, in), the patch-embedding kernel (p·p·C, D) becomes the
  (D, C, p, p) convolution weight, the stacked blocks are split into ``blocks.<i>.*``,
  and ``pos_embed`` / ``feat_rope.freqs_cos`` / ``feat_rope.freqs_sin`` are added.
  Arrays keep their dtype; shapes are checked against ``cfg``.
  """
  d, c_in, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
  sd: dict[str, np.ndarray] = {}

  def get(path: str, shape=None) -> np.ndarray:
    node: Any = params
    for key in path.split("/"):
      if not isinstance(node, Mapping) or key not in node:
        raise ExportError(f"parameters have no '{path}' (config {cfg})")
      node = node[key]
    arr = np.asarray(node)
    if shape is not None and tuple(arr.shape) != tuple(shape):
      raise ExportError(f"parameter '{path}' has shape {tuple(arr.shape)}, the config "
                        f"expects {tuple(shape)}")
    return arr

  def linear(src: str, dst: str, index=None) -> None:
    kernel, bias = get(f"{src}/kernel"), get(f"{src}/bias")
    if index is not None:
      kernel, bias = kernel[index], bias[index]
    sd[f"{dst}.weight"] = np.ascontiguousarray(kernel.T)
    sd[f"{dst}.bias"] = np.ascontiguousarray(bias)

  kernel = get("x_embedder/kernel", (p * p * c_in, d))
  sd["x_embedder.proj.weight"] = np.ascontiguousarray(
      kernel.reshape(p, p, c_in, d).transpose(3, 2, 0, 1))
  sd["x_embedder.proj.bias"] = get("x_embedder/bias", (d,))
  if cfg.num_time_embedders > 2 or cfg.learned_clocks:
    raise ValueError("the reference (PyTorch) format has one or two timestep embedders and "
                     "no learned clocks; this model's clock schedule has "
                     f"{cfg.num_time_embedders} embedders / learned clocks "
                     f"{[n for n, _ in cfg.learned_clocks]}")
  if getattr(cfg, "interval_embedding", False):
    raise ExportError("the reference (PyTorch) format has no interval embedders: this is an "
                      "average-velocity (objective.name='meanflow') model; export it with "
                      "config.export.formats='orbax'")
  embedders = (("t_embedder_sem", "t_embedder_tex") if cfg.num_time_embedders == 2
               else ("t_embedder",))
  for name in embedders:
    linear(f"{name}/mlp_0", f"{name}.mlp.0")
    linear(f"{name}/mlp_2", f"{name}.mlp.2")
  sd["y_embedder.embedding_table.weight"] = get(
      "y_embedding", (cfg.num_classes + int(cfg.class_dropout_prob > 0), d))

  depth = get("blocks/attn/qkv/kernel").shape[0]
  if depth != cfg.depth:
    raise ExportError(f"parameters have {depth} blocks, the config has depth={cfg.depth}")
  for i in range(depth):
    b = f"blocks.{i}"
    if cfg.use_rmsnorm:                 # affine-free LayerNorms have no weights
      sd[f"{b}.norm1.weight"] = get("blocks/norm1/scale")[i]
      sd[f"{b}.norm2.weight"] = get("blocks/norm2/scale")[i]
    linear("blocks/attn/qkv", f"{b}.attn.qkv", i)
    if cfg.use_qknorm:
      for qk in ("q_norm", "k_norm"):
        sd[f"{b}.attn.{qk}.weight"] = get(f"blocks/attn/{qk}/scale")[i]
        if not cfg.use_rmsnorm:
          sd[f"{b}.attn.{qk}.bias"] = get(f"blocks/attn/{qk}/bias")[i]
    linear("blocks/attn/proj", f"{b}.attn.proj", i)
    for name in (("w12", "w3") if cfg.use_swiglu else ("fc1", "fc2")):
      linear(f"blocks/mlp/{name}", f"{b}.mlp.{name}", i)
    linear("blocks/adaLN_modulation", f"{b}.adaLN_modulation.1", i)
  if cfg.use_rmsnorm:
    sd["final_layer.norm_final.weight"] = get("final_layer/norm_final/scale", (d,))
  linear("final_layer/linear", "final_layer.linear")
  linear("final_layer/adaLN_modulation", "final_layer.adaLN_modulation.1")
  if cfg.use_repa:
    for ours, ref in (("l0", "0"), ("l2", "2"), ("l4", "4")):
      linear(f"repa_projector/{ours}", f"repa_projector.{ref}")
  sd.update(reference_buffers(cfg))
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------


def np_dtype(name: str) -> np.dtype:
  """NumPy dtype for a name, bfloat16 included (via ml_dtypes, as JAX does)."""
  return np.dtype(jnp.dtype(name))


def cast_tree(tree: Mapping[str, Any], dtype: str) -> dict:
  """Casts every floating-point array of a nested dict to ``dtype``; others stay as is."""
  target = np_dtype(dtype)

  def one(a):
    a = np.asarray(a)
    return a.astype(target) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return {k: (cast_tree(v, dtype) if isinstance(v, Mapping) else one(v))
          for k, v in tree.items()}


def _prepare_dst(dst: str, overwrite: bool) -> None:
  if os.path.isdir(dst) and os.listdir(dst):
    if not overwrite:
      raise errors.OutputExistsError(f"export destination {dst} is not empty (set "
                            "config.export.overwrite=True, or --overwrite, to replace an "
                            "earlier export there)")
    for name in _OWNED:
      path = os.path.join(dst, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  os.makedirs(dst, exist_ok=True)


def export_params(params: Mapping[str, Any], cfg, dst: str, *,
                  formats=("orbax", "safetensors"), dtype: str = "float32",
                  overwrite: bool = False, info: Mapping[str, Any] | None = None) -> dict:
  """Writes ``params`` of ``LightningDiT(cfg)`` in the requested formats into ``dst``.

  ``info`` (source, step, weights, ...) goes into ``meta.json`` and ``export.json``.
  Returns the manifest (also written to ``dst/export.json``).
  """
  formats = parse_formats(formats)
  ExportOptions(dtype=dtype, formats=formats)       # validates both
  dst = os.path.abspath(dst)
  _prepare_dst(dst, overwrite)
  cast = cast_tree(params, dtype)
  meta = {**config_to_meta(cfg), **dict(info or {}), "stored_dtype": dtype}
  files = []
  if "orbax" in formats:
    save_params(dst, cast, meta, force=True)
    files += ["params", "meta.json"]
  if "safetensors" in formats or "npz" in formats:
    sd = to_reference_state_dict(cast, cfg)
    sd = {k: v.astype(np_dtype(dtype)) for k, v in sd.items()}   # buffers too
    if "safetensors" in formats:
      name = f"{REFERENCE_NAME}.safetensors"
      save_file(sd, os.path.join(dst, name),
                metadata={"format": "pt", "sfd_jax": json.dumps(meta, default=str)})
      files.append(name)
    if "npz" in formats:
      name = f"{REFERENCE_NAME}.npz"
      if dtype == "bfloat16":
        logging.info("npz has no bfloat16: storing the bf16-rounded values as float32")
        sd = {k: v.astype(np.float32) for k, v in sd.items()}
      np.savez(os.path.join(dst, name), **sd)
      files.append(name)
  manifest = {**meta, "files": files, "formats": list(formats)}
  with open(os.path.join(dst, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True, default=str)
  return manifest


# ----------------------------------------------------------------------------------
# From runs
# ----------------------------------------------------------------------------------


def export_run(config, workdir: str) -> dict:
  """``config.export`` of the LightningDiT run in ``workdir`` (``--mode=export``).

  The architecture comes from the checkpoint's saved config (what was trained); a
  different model section in the given config is reported, not used.
  """
  opts = ExportOptions.from_config(config)
  ckpt_dir = runs.checkpoint_dir(workdir)
  saved = runs.read_config(ckpt_dir) if runs.is_run(workdir) else {}
  if saved and runs.run_kind(saved) != "sfd":
    kind = runs.run_kind(saved)
    hint = (f": export it with python -m sfd_jax.checkpoint.export --run={workdir} "
            f"--kind={kind.replace('texture_vae_gan', 'texture_vae')} --dst=DIR"
            if kind.replace("texture_vae_gan", "texture_vae") in networks.TRAINABLE else "")
    raise ExportError(f"--workdir={workdir} is {runs.run_name(kind)}; --mode=export exports "
                      f"SFD (LightningDiT) runs{hint}")
  params, model_cfg, step, run_cfg = runs.restore_dit(ckpt_dir, weights=opts.weights,
                                                      step=opts.step, config=config)
  try:
    given = DiTConfig.from_config(config)
  except (ValueError, TypeError, AttributeError):
    given = None
  if given is not None and given != model_cfg:
    diff = {f.name: (getattr(given, f.name), getattr(model_cfg, f.name))
            for f in dataclasses.fields(model_cfg)
            if getattr(given, f.name) != getattr(model_cfg, f.name)}
    logging.warning("the given config's model differs from the checkpoint's (given, "
                    "checkpoint): %s; exporting what the checkpoint holds", diff)
  dst = opts.dst or os.path.join(os.path.abspath(workdir), "export",
                                 f"{step}-{opts.weights}-{opts.dtype}")
  info = {"source": f"{ckpt_dir}/{step}", "step": step, "weights": opts.weights,
          "run_config": run_cfg or None}
  manifest = export_params(params, model_cfg, dst, formats=opts.formats, dtype=opts.dtype,
                           overwrite=opts.overwrite, info=info)
  logging.info("exported %s weights of %s/%d (%s) to %s: %s", opts.weights, ckpt_dir, step,
               opts.dtype, dst, ", ".join(manifest["files"]))
  return {"dst": dst, **manifest}


def export_converted(config, workdir: str, kind: str, dst: str, step: int | None = None,
                     force: bool = False, weights: str = "params") -> str:
  """Writes one weight set of an autoencoder or feature-net run (``kind``: one of
  ``networks.TRAINABLE``) as a converted-weights folder, which the data jobs, sampling
  and the metrics read like converted reference weights. The architecture is
  ``config.model`` (None: the run's saved config). Only the network is exported: a GAN
  run's discriminator and the VF projection are training-only."""
  if kind not in networks.TRAINABLE:
    raise ConfigError(f"export kind {kind!r}: expected one of {networks.TRAINABLE}")
  if weights not in runs.WEIGHTS:
    raise ConfigError(f"export weights {weights!r}: expected 'params' or 'ema'")
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  saved = runs.read_config(ckdir, step)
  found = runs.run_kind(saved).replace("texture_vae_gan", "texture_vae") if saved else kind
  if found != kind:
    raise ExportError(f"--run={workdir} is {runs.run_name(runs.run_kind(saved))}, not a "
                      f"{kind} run"
                      + (f"; use --kind={found}" if found in networks.TRAINABLE else
                         "; an SFD run is exported with main.py --mode=export"))
  if weights == "ema" and not float(saved.get("ema_decay", 0.0) or 0.0) > 0:
    raise CheckpointError(f"{workdir}: the run keeps no 'ema' weights (ema_decay is 0)")
  section = (config.model.to_dict() if config is not None else
             runs.model_section(saved, ckdir, kind))
  config_cls, model_cls, meta_kind = networks.NETWORKS[kind]
  model_cfg = config_from_json({k: v for k, v in section.items()
                                if k not in ("dtype", "param_dtype")}, config_cls)
  abstract = runs.abstract_params(lambda: model_cls(model_cfg, rngs=nnx.Rngs(0)))
  params, step = runs.restore_weights(ckdir, abstract, weights=weights, step=step)
  meta = {"kind": meta_kind, "config": dataclasses.asdict(model_cfg),
          "source": f"{os.path.abspath(workdir)} step {step} ({weights})"}
  return save_params(dst, params, meta=meta, force=force)


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
  """``python -m sfd_jax.checkpoint.export``: a converted LightningDiT -> other formats, or a
  network run -> a converted folder."""
  ap = runner.ArgumentParser(prog="python -m sfd_jax.checkpoint.export", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--src", help="converted LightningDiT dir (params/ + meta.json), e.g. "
                                 "from sfd_jax.convert.lightning_dit or an earlier export")
  src.add_argument("--run", help="an autoencoder or feature-net training workdir")
  ap.add_argument("--dst", required=True, help="output directory")
  ap.add_argument("--formats", default="safetensors",
                  help=f"comma-separated subset of {FORMATS} (default: safetensors)")
  ap.add_argument("--dtype", default="float32", choices=DTYPES)
  ap.add_argument("--overwrite", action="store_true", help="replace an earlier export in --dst")
  ap.add_argument("--kind", choices=networks.TRAINABLE, help="--run: the network trained")
  ap.add_argument("--step", type=int, default=-1, help="--run: the step (-1: latest)")
  ap.add_argument("--weights", default="params", choices=runs.WEIGHTS,
                  help="--run: the weight set")
  args = ap.parse_args(argv)
  if args.run:
    if not args.kind:
      ap.error("--run needs --kind")
    out = export_converted(None, args.run, args.kind, args.dst,
                           None if args.step < 0 else args.step, args.overwrite, args.weights)
    print(f"wrote {out}")
    return 0
  params, meta = load_params(args.src, "lightning_dit")
  if "config" not in meta:
    raise ExportError(f"--src {args.src}: meta.json has no 'config' entry (expected a folder "
                      "written by sfd_jax.convert.lightning_dit or --mode=export)")
  cfg = DiTConfig(**meta["config"])
  manifest = export_params(params, cfg, args.dst, formats=args.formats, dtype=args.dtype,
                           overwrite=args.overwrite, info={"source": os.path.abspath(args.src)})
  print(f"exported {args.src} -> {args.dst}: {', '.join(manifest['files'])}")
  return 0


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.checkpoint.export")
