"""LDM / Lightning texture-VAE checkpoint → ``sfd_jax.models.texture_vae.TextureVAE``.

The reference checkpoint (``ldm-imagenet256-f16d32-50ep.ckpt``) is a PyTorch Lightning
file whose ``state_dict`` entry holds ``encoder.*``, ``decoder.*``, ``quant_conv.*`` and
``post_quant_conv.*`` plus training-only weights (``loss.*``: LPIPS and discriminator;
VA-VAE variants also carry the vision-foundation model and its projection). The
training-only keys are ignored; every other key must be consumed, and every key the
model needs must be present with the PyTorch shape, or ``ConversionError`` names it.

Because the NNX module attributes carry the LDM key names, the converter walks the
(abstract, never allocated) model: each ``nnx.Conv`` at path ``encoder/down/0/block/1/conv1``
reads ``encoder.down.0.block.1.conv1.{weight,bias}`` (OIHW → HWIO) and each GroupNorm
reads ``….{weight,bias}`` into ``{scale, bias}``.

Command line::

  python -m sfd_jax.convert.texture_vae --src ldm-imagenet256-f16d32-50ep.ckpt \\
      --dst /ckpt/texture_vae_f16d32 [--preset f16d32 | --config-json vavae/configs/
      f16d32_ldm.yaml] [--force]

writes an Orbax params tree plus ``meta.json`` (``{"kind": "texture_vae", "config": …}``)
that ``load_converted_texture_vae`` reads back.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from sfd_jax.core import runner, trees
from sfd_jax.convert.common import (ConversionError, StateDict, abstract_model, assign,
                                    config_from_json, load_params, load_state_dict,
                                    read_json_arg, save_params)
from sfd_jax.models.texture_vae import PRESETS, TextureVAE, TextureVAEConfig

KIND = "texture_vae"

# Key prefixes of LDM/VA-VAE checkpoints that are not part of the autoencoder:
# the LPIPS + discriminator loss module, the (VA-VAE) vision-foundation model and its
# latent projection, and LDM's optional EMA copy.
IGNORE_PREFIXES: tuple[str, ...] = (
    "loss.", "foundation_model.", "linear_proj.", "reverse_proj.", "model_ema.")


@functools.lru_cache(maxsize=8)
def _abstract_template(cfg: TextureVAEConfig, dtype) -> TextureVAE:
  return abstract_model(TextureVAE, cfg, dtype)


def _abstract_model(cfg: TextureVAEConfig, dtype=None) -> TextureVAE:
  """A fresh abstract (ShapeDtypeStruct-valued) model; tracing it once per config."""
  return nnx.clone(_abstract_template(cfg, dtype))


@functools.lru_cache(maxsize=8)
def _layout(cfg: TextureVAEConfig) -> tuple[tuple[tuple[str, ...], str, tuple[int, ...]], ...]:
  """(module path, "conv"|"norm", dims) of every parameterised module of TextureVAE(cfg).

  Read once per config from the abstract model; dims are (in, out, kh, kw) for a
  convolution and (channels,) for a GroupNorm.
  """
  out = []
  for keys, node in nnx.iter_graph(_abstract_template(cfg, None)):
    if any(isinstance(p, str) and p.startswith("_") for p in keys):
      continue
    keys = tuple(str(p) for p in keys)
    if isinstance(node, nnx.Conv):
      out.append((keys, "conv", (node.in_features, node.out_features) + tuple(node.kernel_size)))
    elif isinstance(node, nnx.GroupNorm):
      out.append((keys, "norm", (node.scale.get_value().shape[-1],)))
    elif isinstance(node, nnx.Module) and any(
        isinstance(v, nnx.Param) for v in vars(node).values()):
      raise TypeError(f"texture VAE converter: no rule for {type(node).__name__} at "
                      f"{'/'.join(keys)}")
  return tuple(out)


def convert_texture_vae(sd: Mapping[str, np.ndarray] | StateDict, cfg: TextureVAEConfig,
                        name: str = "texture VAE checkpoint",
                        ignore_prefixes: Iterable[str] = IGNORE_PREFIXES) -> dict:
  """Maps an LDM ``AutoencoderKL`` state dict onto the nested params of ``TextureVAE(cfg)``.

  Args:
    sd: flat ``{key: array}`` in PyTorch layouts (or a ``StateDict``).
    cfg: the architecture the weights are for.
    name: how errors refer to the checkpoint (e.g. its file name).
    ignore_prefixes: key prefixes that may be present but are not converted (ignored
      when ``sd`` is already a ``StateDict``).

  Returns:
    Nested ``{module: {…: {"kernel"|"scale"|"bias": array}}}`` for ``assign``.

  Raises:
    ConversionError: a key is missing, has the wrong shape, or is left unused.
  """
  if not isinstance(sd, StateDict):
    sd = StateDict(sd, name=name, ignore_prefixes=ignore_prefixes)
  params: dict = {}
  for path, kind, dims in _layout(cfg):
    key = ".".join(path)
    leaves = sd.conv(key, *dims) if kind == "conv" else sd.norm(key, *dims)
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node.update(leaves)
  sd.check_all_used()
  return params


def load_reference_file(path: str | os.PathLike, cfg: TextureVAEConfig | None = None, *,
                        dtype=None, ignore_prefixes: Iterable[str] = IGNORE_PREFIXES
                        ) -> TextureVAE:
  """Builds a ``TextureVAE`` from a reference checkpoint file.

  Args:
    path: ``.ckpt``/``.pt`` (Lightning; the ``state_dict`` entry is used; needs the
      optional PyTorch install, loaded weights-only), ``.npz`` or ``.safetensors``.
    cfg: architecture (default: ``TextureVAEConfig.f16d32()``).
    dtype: compute dtype of the returned model (parameters are float32).
    ignore_prefixes: key prefixes to skip (training-only weights).
  """
  cfg = cfg or TextureVAEConfig.f16d32()
  sd = load_state_dict(path, entries=("state_dict",))
  params = convert_texture_vae(sd, cfg, name=os.fspath(path), ignore_prefixes=ignore_prefixes)
  return _model_from_params(params, cfg, dtype=dtype, name=os.fspath(path))


def _model_from_params(params: Mapping[str, Any], cfg: TextureVAEConfig, *, dtype,
                       name: str) -> TextureVAE:
  # Parameters are all overwritten, so the model is built abstractly (no random init);
  # only a model with dropout needs a concrete RNG state, hence a real build.
  if cfg.dropout > 0:
    model = TextureVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  else:
    model = _abstract_model(cfg, dtype=dtype)
  assign(model, params, name=name)
  return model


def save_converted(dst: str | os.PathLike, params: Mapping[str, Any], cfg: TextureVAEConfig,
                   source: str = "", force: bool = False) -> str:
  """Writes converted params with ``meta.json = {"kind": "texture_vae", "config": …}``."""
  meta = {"kind": KIND, "config": cfg.to_dict(), "source": source}
  return save_params(dst, params, meta=meta, force=force)


def load_converted_texture_vae(directory: str | os.PathLike, *, dtype=None) -> TextureVAE:
  """Reads a directory written by the CLI / ``save_converted`` into a ``TextureVAE``."""
  params, meta = load_params(directory, KIND)
  if "config" not in meta:
    raise ConversionError(f"{directory}: meta.json has no 'config' entry")
  cfg = TextureVAEConfig.from_dict(meta["config"])
  return _model_from_params(params, cfg, dtype=dtype, name=os.fspath(directory))


def config_from_fields(fields: Mapping[str, Any]) -> TextureVAEConfig:
  """``TextureVAEConfig`` fields, or an LDM config: ``{"embed_dim", "ddconfig"}`` (the
  ``AutoencoderKL`` constructor's arguments), ``{"params": {...}}`` or the whole YAML
  ``{"model": {"params": {...}}}`` (``TextureVAEConfig.from_ldm``)."""
  d = dict(fields)
  if "model" in d:
    d = dict(d["model"])
  if "params" in d:
    d = dict(d["params"])
  if "ddconfig" in d:
    if "embed_dim" not in d:
      raise ConversionError("--config-json: an LDM config needs embed_dim next to ddconfig")
    return TextureVAEConfig.from_ldm(d["ddconfig"], d["embed_dim"])
  return config_from_json(d, TextureVAEConfig)


def main(argv: Sequence[str] | None = None) -> str:
  parser = runner.ArgumentParser(
      prog="python -m sfd_jax.convert.texture_vae",
      description="Convert an LDM/Lightning texture-VAE checkpoint to an sfd_jax "
                  "Orbax params directory.")
  parser.add_argument("--src", required=True,
                      help="reference checkpoint (.ckpt, .pt, .npz or .safetensors)")
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--preset", default="f16d32", choices=PRESETS,
                      help="architecture of the checkpoint (default f16d32)")
  parser.add_argument("--config-json", default=None,
                      help="architecture beyond the presets (replaces --preset): JSON, inline "
                           "or a file (.yaml needs PyYAML), of TextureVAEConfig fields or of "
                           "the LDM config: {\"embed_dim\": 32, \"ddconfig\": {...}}, its "
                           "model.params section, or the whole LDM YAML")
  parser.add_argument("--force", action="store_true", help="overwrite a non-empty --dst")
  args = parser.parse_args(argv)
  if args.config_json:
    cfg = config_from_fields(read_json_arg(args.config_json))
    args.preset = "custom"
  else:
    cfg = TextureVAEConfig.preset(args.preset)
  sd = load_state_dict(args.src, entries=("state_dict",))
  try:
    params = convert_texture_vae(sd, cfg, name=args.src)
  except ConversionError as e:
    raise ConversionError(f"{e} (converting for --preset {args.preset})") from e
  out = save_converted(args.dst, params, cfg, source=os.path.abspath(args.src),
                       force=args.force)
  n = sum(int(np.prod(v.shape)) for v in trees.flatten(params).values())
  print(f"texture VAE ({args.preset}, {n:,} parameters) written to {out}")
  return out


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.convert.texture_vae")
