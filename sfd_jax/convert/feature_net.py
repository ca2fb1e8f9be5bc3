"""Saving and loading the demo's feature network (``sfd_jax.models.feature_net``) in the
converted-weights layout (``params/`` + ``meta.json`` of kind ``demo_feature_net``)."""
from __future__ import annotations

import os
from typing import Any, Mapping

from flax import nnx

from sfd_jax.convert.common import ConversionError, assign, load_params, save_params
from sfd_jax.models.feature_net import KIND, DemoFeatureNet, FeatureNetConfig


def save_feature_net(directory: str | os.PathLike, net: DemoFeatureNet,
                     extra: Mapping[str, Any] | None = None) -> str:
  meta = {"kind": KIND, "config": net.cfg.to_dict(), **dict(extra or {})}
  return save_params(directory, nnx.to_pure_dict(nnx.state(net, nnx.Param)), meta=meta,
                     force=True)


def load_feature_net(directory: str | os.PathLike) -> DemoFeatureNet:
  params, meta = load_params(directory, KIND)
  if "config" not in meta:
    raise ConversionError(f"{directory}: meta.json has no 'config' entry")
  net = DemoFeatureNet(FeatureNetConfig.from_dict(meta["config"]), rngs=nnx.Rngs(0))
  assign(net, params, name=os.fspath(directory))
  return net
