"""Reference LightningDiT state dict (PyTorch names/layouts) -> sfd_jax parameters.

Usage as a command (turns a released checkpoint into an Orbax checkpoint that the
trainer (``init_from``) and the sampler load)::

  python -m sfd_jax.convert.lightning_dit --src 4000000.pt --variant XL --dst ckpt/sfd_xl

``.pt`` files hold ``{"model", "ema", "opt", "config"}``; the EMA weights are taken when
present (``--entry model`` picks the raw weights). All formats are read without PyTorch;
a ``.pt`` through the restricted unpickler (``safe_pickle``: the OmegaConf config in the
file is read as inert data, never constructed). ``--config-from-checkpoint`` takes the
architecture from that config; ``--config-json`` accepts sfd_jax or reference field
names. LightningDiT's own models (QK-norm / SwiGLU / RoPE / RMSNorm switched off,
texture-only 32 channels with Δt = 0) convert too, e.g. its released XL/1::

  python -m sfd_jax.convert.lightning_dit --src lightningdit-xl-imagenet256-800ep.pt \
      --dst ckpt/lightningdit_xl --config-json '{"model_type": "LightningDiT-XL/1",
      "in_chans": 32, "use_qknorm": false, "use_swiglu": true, "use_rope": true,
      "use_rmsnorm": true}'
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from flax import nnx

from sfd_jax.core import errors, runner, safe_pickle, trees
from sfd_jax.convert.common import (ConversionError, StateDict, assign, load_params,
                                    load_state_dict, read_json_arg, save_params)
from sfd_jax.models.lightning_dit import (VARIANT_ALIASES, VARIANTS, DiTConfig, LightningDiT,
                                          rope_tables, sincos_pos_embed)

# Buffers the reference keeps in its state dict; recomputed from the config here and
# only checked (shape always; values when ``check_buffers``).
_BUFFERS = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")


def convert_lightning_dit(sd, cfg: DiTConfig, name: str = "checkpoint",
                          check_buffers: bool = True) -> dict:
  """Returns the nested parameter dict of ``LightningDiT(cfg)`` from a reference state dict."""
  if not isinstance(sd, StateDict):
    sd = StateDict(sd, name=name)
  d, c_in, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
  h, hd = cfg.mlp_hidden, cfg.head_dim
  out: dict = {}
  w = sd.get("x_embedder.proj.weight", (d, c_in, p, p))
  # Conv (D, C, p, p) over a p×p patch -> Dense over the flattened (p, p, C) patch.
  out["x_embedder"] = {"kernel": w.transpose(2, 3, 1, 0).reshape(p * p * c_in, d),
                       "bias": sd.get("x_embedder.proj.bias", (d,))}

  def t_emb(prefix, width):
    return {"mlp_0": sd.linear(f"{prefix}.mlp.0", 256, width),
            "mlp_2": sd.linear(f"{prefix}.mlp.2", width, width)}

  if cfg.semantic_first:
    if "t_embedder.mlp.0.weight" in sd:
      raise ConversionError(f"{name}: has a single timestep embedder ('t_embedder.*', a Δt = 0 "
                            f"model) but the config has delta_t={cfg.delta_t}")
    out["t_embedder_sem"] = t_emb("t_embedder_sem", d // 2)
    out["t_embedder_tex"] = t_emb("t_embedder_tex", d - d // 2)
  else:
    if "t_embedder_sem.mlp.0.weight" in sd:
      raise ConversionError(f"{name}: has two timestep embedders (a semantic-first model) but "
                            "the config has delta_t=0")
    out["t_embedder"] = t_emb("t_embedder", d)
  rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
  out["y_embedding"] = sd.get("y_embedder.embedding_table.weight", (rows, d))

  blocks = []
  for i in range(cfg.depth):
    b = f"blocks.{i}"
    block = {
        "attn": {"qkv": sd.linear(f"{b}.attn.qkv", d, 3 * d),
                 "proj": sd.linear(f"{b}.attn.proj", d, d)},
        "adaLN_modulation": sd.linear(f"{b}.adaLN_modulation.1", d, cfg.adaln_chunks * d),
    }
    if cfg.use_rmsnorm:          # LayerNorm without affine parameters has no keys
      block["norm1"] = {"scale": sd.get(f"{b}.norm1.weight", (d,))}
      block["norm2"] = {"scale": sd.get(f"{b}.norm2.weight", (d,))}
    if cfg.use_qknorm:           # RMSNorm: weight; LayerNorm: weight and bias
      for qk in ("q_norm", "k_norm"):
        block["attn"][qk] = sd.norm(f"{b}.attn.{qk}", hd, bias=not cfg.use_rmsnorm)
    if cfg.use_swiglu:
      block["mlp"] = {"w12": sd.linear(f"{b}.mlp.w12", d, 2 * h),
                      "w3": sd.linear(f"{b}.mlp.w3", h, d)}
    else:
      gh = cfg.gelu_hidden
      block["mlp"] = {"fc1": sd.linear(f"{b}.mlp.fc1", d, gh),
                      "fc2": sd.linear(f"{b}.mlp.fc2", gh, d)}
    blocks.append(block)
  if f"blocks.{cfg.depth}.norm1.weight" in sd:
    raise ConversionError(f"{name}: has more than depth={cfg.depth} blocks")
  out["blocks"] = _stack(blocks)
  out["final_layer"] = {
      "linear": sd.linear("final_layer.linear", d, p * p * cfg.out_channels),
      "adaLN_modulation": sd.linear("final_layer.adaLN_modulation.1", d, 2 * d),
  }
  if cfg.use_rmsnorm:
    out["final_layer"]["norm_final"] = {"scale": sd.get("final_layer.norm_final.weight", (d,))}
  if cfg.use_repa:
    pd = cfg.repa_projector_dim
    out["repa_projector"] = {"l0": sd.linear("repa_projector.0", d, pd),
                             "l2": sd.linear("repa_projector.2", pd, pd),
                             "l4": sd.linear("repa_projector.4", pd, cfg.repa_dim)}
  else:
    # A projector in the file is harmless for inference (it never runs in eval mode).
    sd.mark_used(*[k for k in sd.keys() if k.startswith("repa_projector.")])

  grid = cfg.input_size // p
  expected = {"pos_embed": sincos_pos_embed(d, grid)[None]}
  cos, sin = rope_tables(hd, grid)
  expected["feat_rope.freqs_cos"], expected["feat_rope.freqs_sin"] = cos, sin
  for key in _BUFFERS:
    if key.startswith("feat_rope.") and key in sd and not cfg.use_rope:
      raise ConversionError(f"{name}: has RoPE tables ('{key}') but the config has "
                            "use_rope=False")
    if key in sd:
      got = sd.get(key, expected[key].shape)
      if check_buffers and not np.allclose(got, expected[key], atol=1e-5):
        raise ConversionError(f"{name}: buffer '{key}' differs from the table recomputed from "
                              f"the config (max diff {np.abs(got - expected[key]).max():.3g}); "
                              "input_size/hidden_size/num_heads do not match the checkpoint")
  sd.check_all_used()
  return out


def _stack(items: list[dict]) -> dict:
  first = items[0]
  return {k: (_stack([it[k] for it in items]) if isinstance(v, dict)
              else np.stack([it[k] for it in items])) for k, v in first.items()}


def load_lightning_dit(src, cfg: DiTConfig, prefix: str = "", entry: str | None = None,
                       name: str | None = None) -> LightningDiT:
  """Builds a LightningDiT from a reference file (``.pt``/``.npz``/``.safetensors``) or a
  state dict (mapping). ``prefix`` selects e.g. the ``guide/`` weights of a fixture."""
  if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
    entries = [entry] if entry else ["ema", "model"]
    sd = load_state_dict(src, entries=entries, prefix=prefix)
    name = name or str(src)
  else:
    sd = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
    name = name or "state dict"
  params = convert_lightning_dit(sd, cfg, name=name)
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  assign(model, params, name=name)
  return model


def config_to_meta(cfg: DiTConfig) -> dict:
  return {"kind": "lightning_dit", "config": dataclasses.asdict(cfg)}


def load_converted(directory, **overrides) -> LightningDiT:
  """Loads a directory written by this converter (or by ``--mode=export``)."""
  params, meta = load_params(directory, "lightning_dit")
  cfg = DiTConfig(**{**meta["config"], **overrides})
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  assign(model, params, name=str(directory))
  return model


# Names only the reference uses (constructor arguments / YAML ``model`` section).
REFERENCE_ONLY_FIELDS = frozenset({
    "model", "model_type", "in_chans", "semfirst_delta_t", "learn_sigma", "use_checkpoint",
    "repa_dino_version", "repa_feat_depth", "semfirst_infer_interval_mode"})


def read_config_json(text_or_path: str) -> dict:
  """A JSON object given inline or as a file (``common.read_json_arg``)."""
  return read_json_arg(text_or_path)


def config_from_fields(fields: dict, variant: str = "XL", fmt: str = "auto") -> DiTConfig:
  """``DiTConfig`` from ``--config-json`` fields.

  ``fmt="sfd_jax"``: ``DiTConfig`` field names overriding ``variant`` (``"custom"``: the
  fields alone). ``fmt="reference"``: the reference's names — either a training YAML
  (a ``model`` section with ``model_type``, ``in_chans``, ...; see
  ``DiTConfig.from_reference_config``) or the constructor's keyword arguments
  (``in_channels``, ``use_qknorm``, ``semfirst_delta_t``, ...; absent architecture flags
  are *off*, the constructor's defaults; absent sizes come from ``variant``).
  ``fmt="auto"`` picks "reference" when a reference-only name (``model_type``,
  ``in_chans``, ``semfirst_delta_t``, ``learn_sigma``, ``use_checkpoint``,
  ``repa_feat_depth``, ``repa_dino_version``, a ``model`` section) is present.
  """
  if fmt == "auto":
    fmt = "reference" if set(fields) & REFERENCE_ONLY_FIELDS else "sfd_jax"
  if fmt == "sfd_jax":
    if variant == "custom":
      return DiTConfig(**fields)
    return DiTConfig.variant(variant, **fields)
  if fmt != "reference":
    raise ConversionError(f"config format {fmt!r}: expected auto, sfd_jax or reference")
  if "model" in fields or "model_type" in fields:
    return DiTConfig.from_reference_config(fields)
  kw = dict(fields)
  if variant != "custom":
    depth, hidden, heads = VARIANTS[VARIANT_ALIASES.get(variant, variant).split("/")[0]]
    kw.setdefault("depth", depth)
    kw.setdefault("hidden_size", hidden)
    kw.setdefault("num_heads", heads)
  kw.setdefault("input_size", 16)
  if "in_chans" in kw:
    kw["in_channels"] = kw.pop("in_chans")
  if "repa_feat_depth" in kw:
    kw["repa_depth"] = kw.pop("repa_feat_depth")
  return DiTConfig.from_reference_kwargs(kw)


def config_from_checkpoint(path: str) -> DiTConfig:
  """The architecture recorded in a reference training checkpoint's ``config`` entry
  (``{"model", "ema", "opt", "config"}`` of ``train.py``), read without running code."""
  obj = safe_pickle.load(path)
  config = safe_pickle.to_plain(obj.get("config")) if isinstance(obj, dict) else None
  if not isinstance(config, dict) or "model" not in config:
    raise ConversionError(f"{path}: has no reference training config (a 'config' entry with "
                          "a 'model' section); give --variant / --config-json instead")
  return DiTConfig.from_reference_config(config)


def main(argv=None) -> int:
  ap = runner.ArgumentParser(prog="python -m sfd_jax.convert.lightning_dit",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="reference checkpoint (.pt/.npz/.safetensors)")
  ap.add_argument("--dst", required=True, help="output directory (Orbax + meta.json)")
  ap.add_argument("--variant", default="XL",
                  help="S, B, L, XL, XXL (=1p0B), 1p6B, or custom (fields from --config-json)")
  ap.add_argument("--entry", default=None, help="entry of a .pt dict (default: ema, then model)")
  ap.add_argument("--prefix", default="", help="key prefix to select (e.g. 'module.')")
  ap.add_argument("--config-json", default=None,
                  help="JSON object (inline or a file; .yaml needs PyYAML) of DiTConfig fields "
                       "overriding the variant, or of the reference's names (a training "
                       "YAML's model section or the constructor's arguments); see "
                       "--config-format")
  ap.add_argument("--config-format", default="auto", choices=["auto", "sfd_jax", "reference"],
                  help="field names of --config-json (auto: reference when it uses a "
                       "reference-only name such as model_type or in_chans)")
  ap.add_argument("--config-from-checkpoint", action="store_true",
                  help="take the architecture from the .pt's reference training config")
  ap.add_argument("--force", action="store_true", help="overwrite a non-empty --dst")
  args = ap.parse_args(argv)
  if args.config_from_checkpoint:
    if args.config_json:
      raise ConversionError("--config-from-checkpoint and --config-json are exclusive")
    cfg = config_from_checkpoint(args.src)
  else:
    fields = read_config_json(args.config_json) if args.config_json else {}
    try:
      cfg = config_from_fields(fields, args.variant, args.config_format)
    except (ValueError, TypeError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise errors.ConfigError(f"--variant {args.variant} / --config-json "
                               f"{args.config_json or '{}'}: {e}") from e
  sd = load_state_dict(args.src, entries=[args.entry] if args.entry else ["ema", "model"],
                       prefix=args.prefix)
  params = convert_lightning_dit(sd, cfg, name=args.src)
  out = save_params(args.dst, params, {**config_to_meta(cfg), "source": args.src},
                    force=args.force)
  n = sum(int(np.prod(v.shape)) for v in trees.flatten(params).values())
  print(f"converted {args.src} -> {out} ({n / 1e6:.1f}M parameters, variant {args.variant})")
  return 0


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.convert.lightning_dit")
