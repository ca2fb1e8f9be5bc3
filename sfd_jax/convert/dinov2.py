"""DINOv2 hub checkpoint (``dinov2_vitb14_reg4_pretrain.pth``) → ``sfd_jax.models.dinov2``.

Also ViT-L/14 without registers (``--preset vitl14``): the VA-VAE's VF model, from
``dinov2_vitl14_pretrain.pth`` or timm's ``vit_large_patch14_dinov2.lvd142m`` state dict
(same key names; timm has no ``mask_token``, and no ``register_tokens`` key exists).

Reference keys: ``cls_token`` (1,1,C), ``register_tokens`` (1,R,C),
``mask_token`` (1,C) (used only with masks: accepted and ignored), ``pos_embed``
(1, 1+37², C), ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.{norm1,norm2}.*``,
``blocks.{i}.attn.{qkv,proj}.*``, ``blocks.{i}.{ls1,ls2}.gamma``,
``blocks.{i}.mlp.{fc1,fc2}.*``, ``norm.*``.

CLI (writes a standalone converted checkpoint, see ``common.save_params``)::

  python -m sfd_jax.convert.dinov2 --src dinov2_vitb14_reg4_pretrain.pth --dst DIR \
      [--preset vitb14_reg | --config-json '{"hub_name": "dinov2_vitl14_reg"}' |
       --config-json '{"arch_name": "vit_small", "img_size": 518, "patch_size": 14, ...}']
      [--force]
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from sfd_jax.convert import common
from sfd_jax.models.dinov2 import DinoV2, DinoV2Config
from sfd_jax.core import runner

MODEL_KIND = "dinov2"
IGNORED_KEYS = ("mask_token",)


def _vit_block(sd: common.StateDict, prefix: str, dim: int, hidden: int,
               layerscale: bool) -> dict[str, Any]:
  """One pre-norm ViT block of the reference (``blocks.i``) → nested params."""
  out = {
      "norm1": sd.norm(f"{prefix}.norm1", dim),
      "attn": {"qkv": sd.linear(f"{prefix}.attn.qkv", dim, 3 * dim),
               "proj": sd.linear(f"{prefix}.attn.proj", dim, dim)},
      "norm2": sd.norm(f"{prefix}.norm2", dim),
      "mlp": {"fc1": sd.linear(f"{prefix}.mlp.fc1", dim, hidden),
              "fc2": sd.linear(f"{prefix}.mlp.fc2", hidden, dim)},
  }
  if layerscale:
    out["ls1"] = {"gamma": sd.get(f"{prefix}.ls1.gamma", (dim,))}
    out["ls2"] = {"gamma": sd.get(f"{prefix}.ls2.gamma", (dim,))}
  return out


def convert_state_dict(state_dict: Mapping[str, Any], config: DinoV2Config,
                       name: str = "DINOv2 checkpoint") -> dict[str, Any]:
  """Reference state dict → nested params of ``DinoV2(config)``.

  Raises ``ConversionError`` naming the key for missing, wrong-shape or unexpected keys.
  """
  c, d = config, config.embed_dim
  sd = common.StateDict(state_dict, name=name, ignore_prefixes=IGNORED_KEYS)
  if "mask_token" in sd:
    sd.get("mask_token", (1, d))  # shape check only; unused without masks
  params = {
      "patch_embed": sd.conv("patch_embed.proj", c.in_chans, d, c.patch_size, c.patch_size),
      "cls_token": sd.get("cls_token", (1, 1, d))[0],
      "pos_embed": sd.get("pos_embed", (1, 1 + c.grid_size ** 2, d))[0],
      "blocks": {str(i): _vit_block(sd, f"blocks.{i}", d, c.mlp_hidden,
                                    c.layerscale_init is not None)
                 for i in range(c.depth)},
      "norm": sd.norm("norm", d),
  }
  if c.num_register_tokens:
    params["register_tokens"] = sd.get("register_tokens", (1, c.num_register_tokens, d))[0]
  sd.check_all_used()
  return params


def build_abstract(config: DinoV2Config, dtype=None) -> DinoV2:
  """A ``DinoV2`` with unallocated parameters, ready for ``common.assign``."""
  return common.abstract_model(DinoV2, config, dtype)


def load_dinov2(path: str | os.PathLike, config: DinoV2Config | None = None, *,
                dtype=None) -> DinoV2:
  """Builds a ``DinoV2`` holding the weights of ``path``.

  ``path`` is either a directory written by this module's CLI (its ``meta.json``
  supplies the config when ``config`` is None) or a reference checkpoint
  (``.pth``, ``.pt``, ``.npz`` or ``.safetensors``; none needs PyTorch), in which case
  ``config`` defaults to ViT-B/14-reg.
  """
  return common.load_model(path, config, kind=MODEL_KIND, config_cls=DinoV2Config,
                           default_config=DinoV2Config.vitb14_reg, convert=convert_state_dict,
                           build=lambda c: build_abstract(c, dtype=dtype))


def main(argv: list[str] | None = None) -> str:
  return common.converter_main(
      argv, kind=MODEL_KIND, prog="python -m sfd_jax.convert.dinov2",
      description="Convert a DINOv2 (with registers) hub checkpoint to an sfd_jax checkpoint.",
      src_help="hub state dict (.pth/.pt/.npz/.safetensors)",
      presets=["vitb14_reg", "vitl14", "tiny", "tiny_noreg"], default_preset="vitb14_reg",
      config_cls=DinoV2Config,
      convert=convert_state_dict, extra_meta={"ignored_keys": list(IGNORED_KEYS)},
      from_reference=_from_reference,
      reference_help=(" (DinoVisionTransformer: img_size, patch_size, embed_dim, depth, "
                      "num_heads, init_values, num_register_tokens, ..., or arch_name; "
                      "or {\"hub_name\": \"dinov2_vitl14_reg\"})"))


def _from_reference(fields: dict) -> DinoV2Config:
  if "hub_name" in fields:
    if len(fields) > 1:
      raise common.ConversionError("--config-json: hub_name excludes other fields")
    return DinoV2Config.from_hub_name(fields["hub_name"])
  return DinoV2Config.from_reference_kwargs(fields)


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.convert.dinov2")
