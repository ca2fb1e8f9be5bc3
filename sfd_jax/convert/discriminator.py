"""taming ``NLayerDiscriminator`` state dict ↔ ``sfd_jax.models.discriminator``.

Reference keys (``main.<i>`` of the ``nn.Sequential``; for 3 layers convolutions at
0, 2, 5, 8, 11 and BatchNorms at 3, 6, 9): ``main.<conv>.weight`` (O, I, 4, 4),
``main.{0,11}.bias``, ``main.<bn>.{weight, bias, running_mean, running_var,
num_batches_tracked}``. In an LDM / VA-VAE Lightning checkpoint they carry the prefix
``loss.discriminator.``.

``convert_state_dict`` returns ``(params, stats)``: the pure dicts of the module's
``nnx.Param`` and ``nnx.BatchStat`` variables (the trainer's ``disc_params`` and
``disc_stats``); ``to_state_dict`` is the inverse (for exporting a trained
discriminator to the reference layout).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sfd_jax.convert.common import StateDict
from sfd_jax.models.discriminator import DiscriminatorConfig


def convert_state_dict(sd: Mapping[str, Any], config: DiscriminatorConfig = DiscriminatorConfig(),
                       name: str = "discriminator") -> tuple[dict, dict]:
  """Reference state dict → (params, stats) of ``NLayerDiscriminator(config)``."""
  s = StateDict(sd, name=name)
  conv_idx, norm_idx = config.torch_index()
  params: dict[str, Any] = {"convs": {}, "norms": {}}
  stats: dict[str, Any] = {"norms": {}}
  for i, (idx, (cin, cout, _, bias)) in enumerate(zip(conv_idx, config.widths())):
    params["convs"][str(i)] = s.conv(f"main.{idx}", cin, cout, 4, 4, bias=bias)
  for j, idx in enumerate(norm_idx):
    c = config.widths()[j + 1][1]
    params["norms"][str(j)] = s.norm(f"main.{idx}", c)
    stats["norms"][str(j)] = {
        "mean": s.get(f"main.{idx}.running_mean", (c,)),
        "var": s.get(f"main.{idx}.running_var", (c,)),
        "count": np.asarray(s.get(f"main.{idx}.num_batches_tracked", (), dtype=None),
                            np.int32)}
  s.check_all_used()
  return params, stats


def _item(d: Mapping, i: int):
  """``d[i]`` of a pure dict whose list keys are ints (``nnx.to_pure_dict``) or strings."""
  return d[i] if i in d else d[str(i)]


def to_state_dict(params: Mapping[str, Any], stats: Mapping[str, Any],
                  config: DiscriminatorConfig = DiscriminatorConfig(),
                  prefix: str = "") -> dict[str, np.ndarray]:
  """(params, stats) → the reference's state dict (NCHW / OIHW layouts)."""
  conv_idx, norm_idx = config.torch_index()
  out = {}
  for i, idx in enumerate(conv_idx):
    p = _item(params["convs"], i)
    out[f"{prefix}main.{idx}.weight"] = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
    if "bias" in p:
      out[f"{prefix}main.{idx}.bias"] = np.asarray(p["bias"])
  for j, idx in enumerate(norm_idx):
    p, st = _item(params["norms"], j), _item(stats["norms"], j)
    out[f"{prefix}main.{idx}.weight"] = np.asarray(p["scale"])
    out[f"{prefix}main.{idx}.bias"] = np.asarray(p["bias"])
    out[f"{prefix}main.{idx}.running_mean"] = np.asarray(st["mean"])
    out[f"{prefix}main.{idx}.running_var"] = np.asarray(st["var"])
    out[f"{prefix}main.{idx}.num_batches_tracked"] = np.asarray(st["count"], np.int64)
  return out
