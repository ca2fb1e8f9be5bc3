"""SemVAE checkpoint (``semantic_ae_final.pt``) → ``sfd_jax.models.semantic_vae``.

Reference keys, with N transformer blocks: ``encoder.0`` (Linear
in), ``encoder.{1..N}.{norm1,norm2}.*``, ``encoder.{k}.attn.in_proj_weight/_bias``
(rows [q; k; v]), ``encoder.{k}.attn.out_proj.*``, ``encoder.{k}.mlp.{0,2}.*``,
``encoder.{N+1}`` (LayerNorm), ``encoder.{N+2}`` (Linear to 2·bottleneck); the decoder
has the same pattern under ``decoder.``. The released training checkpoint keeps these
under ``model_state_dict`` (next to optimizer/scheduler state), which is picked
automatically; a flat state dict (``.npz``/``.safetensors``) works as well.

A ``.pt`` is read without PyTorch by the restricted unpickler (``safe_pickle``): the
optimizer / scheduler state and config next to the weights are read as inert data and no
code from the file runs. ``allow_pickle=True`` (``--allow-pickle``) uses a full
``torch.load`` instead (needs PyTorch; only for trusted files, e.g. the pre-1.6 non-zip
torch format).

CLI::

  python -m sfd_jax.convert.semantic_vae --src semantic_ae_final.pt --dst DIR \
      [--preset ch16 | --config-json '{"input_dim": 1024, "bottleneck_dim": 16,
       "hidden_dim": 768, "arch": "transformer", "transformer_heads": 8,
       "transformer_blocks": 4}'] [--force] [--allow-pickle]
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import numpy as np

from sfd_jax.convert import common
from sfd_jax.models.semantic_vae import SemanticVAE, SemVAEConfig
from sfd_jax.core import optional, runner

MODEL_KIND = "semantic_vae"
STATE_DICT_ENTRIES = ("model_state_dict",)
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _block(sd: common.StateDict, prefix: str, dim: int, hidden: int) -> dict[str, Any]:
  """One reference ``TransformerBlock`` (``nn.MultiheadAttention`` naming) → params."""
  in_w = sd.get(f"{prefix}.attn.in_proj_weight", (3 * dim, dim))
  in_b = sd.get(f"{prefix}.attn.in_proj_bias", (3 * dim,))
  return {
      "norm1": sd.norm(f"{prefix}.norm1", dim),
      "attn": {"qkv": {"kernel": in_w.T, "bias": in_b},
               "proj": sd.linear(f"{prefix}.attn.out_proj", dim, dim)},
      "norm2": sd.norm(f"{prefix}.norm2", dim),
      "mlp": {"fc1": sd.linear(f"{prefix}.mlp.0", dim, hidden),
              "fc2": sd.linear(f"{prefix}.mlp.2", hidden, dim)},
  }


def _token_transformer(sd: common.StateDict, prefix: str, in_dim: int, out_dim: int,
                       config: SemVAEConfig) -> dict[str, Any]:
  d, n = config.hidden_dim, config.num_blocks
  return {
      "proj_in": sd.linear(f"{prefix}.0", in_dim, d),
      "blocks": {str(i): _block(sd, f"{prefix}.{i + 1}", d, config.mlp_hidden)
                 for i in range(n)},
      "norm": sd.norm(f"{prefix}.{n + 1}", d),
      "proj_out": sd.linear(f"{prefix}.{n + 2}", d, out_dim),
  }


def convert_state_dict(state_dict: Mapping[str, Any], config: SemVAEConfig,
                       name: str = "SemVAE checkpoint") -> dict[str, Any]:
  """Reference state dict → nested params of ``SemanticVAE(config)``.

  Raises ``ConversionError`` naming the key for missing, wrong-shape or unexpected keys.
  """
  sd = common.StateDict(state_dict, name=name)
  c = config
  params = {
      "encoder": _token_transformer(sd, "encoder", c.input_dim, 2 * c.bottleneck_dim, c),
      "decoder": _token_transformer(sd, "decoder", c.bottleneck_dim, c.input_dim, c),
  }
  sd.check_all_used()
  return params


def _torch_load_trusted(path: str) -> dict[str, np.ndarray]:
  """Full (pickle) load of a trusted training checkpoint; returns its model weights."""
  torch = optional.require("torch", extra="torch",
                           purpose=f"{path}: the full pickle read (--allow-pickle)")
  obj = torch.load(path, map_location="cpu", weights_only=False)
  for entry in STATE_DICT_ENTRIES:
    if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
      obj = obj[entry]
  if not isinstance(obj, Mapping):
    raise common.ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads the SemVAE weights of a checkpoint file (``model_state_dict`` if nested)."""
  path = os.fspath(path)
  if not path.endswith(_TORCH_SUFFIXES):
    return common.load_state_dict(path, entries=STATE_DICT_ENTRIES)
  if allow_pickle:
    return _torch_load_trusted(path)
  try:
    return common.load_state_dict(path, entries=STATE_DICT_ENTRIES)
  except common.ConversionError as e:
    if not isinstance(e.__cause__, pickle.UnpicklingError):
      raise
    # not a torch archive the restricted reader understands (or it refused a global)
    raise common.ConversionError(
        f"{path}: could not be read by the restricted unpickler ({e.__cause__}). If you "
        "trust the file, pass allow_pickle=True / --allow-pickle (needs PyTorch), or export "
        "its 'model_state_dict' to .safetensors") from e


def build_abstract(config: SemVAEConfig, dtype=None) -> SemanticVAE:
  """A ``SemanticVAE`` with unallocated parameters, ready for ``common.assign``."""
  return common.abstract_model(SemanticVAE, config, dtype)


def load_semantic_vae(path: str | os.PathLike, config: SemVAEConfig | None = None, *,
                      dtype=None, allow_pickle: bool = False) -> SemanticVAE:
  """Builds a ``SemanticVAE`` holding the weights of ``path``.

  ``path`` is a directory written by this module's CLI (its ``meta.json`` supplies the
  config when ``config`` is None) or a reference checkpoint file, in which case
  ``config`` defaults to the released ch16 model.
  """
  return common.load_model(path, config, kind=MODEL_KIND, config_cls=SemVAEConfig,
                           default_config=SemVAEConfig.ch16, convert=convert_state_dict,
                           build=lambda c: build_abstract(c, dtype=dtype),
                           read=lambda p: read_state_dict(p, allow_pickle))


def main(argv: list[str] | None = None) -> str:
  def add_arguments(parser):
    parser.add_argument("--allow-pickle", action="store_true",
                        help="full torch.load of a trusted .pt (runs pickled code)")

  return common.converter_main(
      argv, kind=MODEL_KIND, prog="python -m sfd_jax.convert.semantic_vae",
      description="Convert a SemVAE checkpoint (semantic_ae_final.pt) to an sfd_jax checkpoint.",
      src_help="checkpoint (.pt with model_state_dict, .npz or .safetensors)",
      presets=["ch16", "tiny"], default_preset="ch16", config_cls=SemVAEConfig,
      convert=convert_state_dict, add_arguments=add_arguments,
      read=lambda args: read_state_dict(args.src, args.allow_pickle),
      from_reference=SemVAEConfig.from_reference_kwargs,
      reference_help=(" (SemanticVariationalAutoEncoder: input_dim, bottleneck_dim, "
                      "hidden_dim, arch, transformer_heads, transformer_blocks; or a "
                      "training YAML's model section)"))


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.convert.semantic_vae")
