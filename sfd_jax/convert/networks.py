"""The networks by kind (texture VAE, DINOv2, Semantic VAE, the demo's feature net):
their config and model classes, loaded from converted folders (or reference files), or
random weights of a preset for tests and smoke runs."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sfd_jax.convert import common
from sfd_jax.convert import dinov2 as convert_dinov2
from sfd_jax.convert import semantic_vae as convert_semantic_vae
from sfd_jax.convert import texture_vae as convert_texture_vae
from sfd_jax.core.errors import ConfigError, MissingFileError
from sfd_jax.models import dinov2, feature_net, semantic_vae, texture_vae

# kind -> (config class, model class, meta.json kind of its converted folder)
NETWORKS = {
    "texture_vae": (texture_vae.TextureVAEConfig, texture_vae.TextureVAE, "texture_vae"),
    "dinov2": (dinov2.DinoV2Config, dinov2.DinoV2, "dinov2"),
    "semvae": (semantic_vae.SemVAEConfig, semantic_vae.SemanticVAE, "semantic_vae"),
    "feature_net": (feature_net.FeatureNetConfig, feature_net.DemoFeatureNet,
                    "demo_feature_net"),
}
NETWORK_KINDS = ("texture_vae", "dinov2", "semvae")    # the data jobs' frozen networks
TRAINABLE = ("semvae", "texture_vae", "feature_net")   # trained by sfd_jax.training.vae


def _dtype(name: str | None):
  return None if not name else jnp.dtype(name)


@functools.lru_cache(maxsize=8)
def random_network(model_cls, cfg, dtype, seed: int) -> nnx.Module:
  """The network with random weights drawn on the host (no compilation).

  For tests and smoke runs: kernels N(0, 1/fan_in) (fan_in = all but the last axis),
  normalisation scales 1 + N(0, 0.1²), every other parameter N(0, 0.02²); seeded
  numpy, so the weights are the same on every machine. Cached (the jobs never modify
  their networks), since building even a tiny NNX model takes seconds.
  """
  model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed), dtype=dtype))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape, name = var.get_value().shape, str(path[-1])
    if name == "kernel":
      value = rng.normal(size=shape) / math.sqrt(max(1, math.prod(shape[:-1])))
    elif name in ("scale", "gamma"):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.02 * rng.normal(size=shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return model


def load_network(kind: str, path: str, *, random_init: bool = False, preset: str = "",
                 dtype: str | None = "float32", seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, field: str = "") -> nnx.Module:
  """One of the frozen networks of the data jobs.

  Args:
    kind: "texture_vae", "dinov2" or "semvae".
    path: folder written by the matching converter (``python -m sfd_jax.convert.<kind>``;
      DINOv2 and SemVAE also accept a reference checkpoint file).
    random_init: build ``preset`` with random weights instead (tests, smoke runs).
    preset: architecture preset used with ``random_init``.
    dtype: compute dtype (parameters stay float32).
    seed: random-init seed.
    overrides: config fields replaced in the preset (``random_init`` only).
    field: the config field that names ``path`` (for errors: a folder of another network
      is named as such).
  """
  if kind not in NETWORK_KINDS:
    raise ValueError(f"network kind {kind!r} not one of {NETWORK_KINDS}")
  dt = _dtype(dtype)
  if random_init:
    cfg_cls, model_cls, _ = NETWORKS[kind]
    cfg = dataclasses.replace(cfg_cls.preset(preset), **dict(overrides or {}))
    logging.info("%s: random weights of preset %r (%s)", kind, preset, cfg)
    return random_network(model_cls, cfg, dt, seed)
  if not path:
    raise ConfigError(f"no converted {kind} checkpoint given; convert one with "
                     f"python -m sfd_jax.convert.{kind.replace('semvae', 'semantic_vae')} "
                     "(see docs/encode.md)")
  if not os.path.exists(path):
    raise MissingFileError(f"{field + '=' if field else ''}{kind} checkpoint {path} not found; "
                           "convert one with python -m "
                           f"sfd_jax.convert.{kind.replace('semvae', 'semantic_vae')}")
  if os.path.isdir(path):
    common.check_converted_dir(path, NETWORKS[kind][2], field)
  if kind == "texture_vae":
    return convert_texture_vae.load_converted_texture_vae(path, dtype=dt)
  if kind == "dinov2":
    return convert_dinov2.load_dinov2(path, dtype=dt)
  return convert_semantic_vae.load_semantic_vae(path, dtype=dt)


def load_feature_net(directory: str | os.PathLike) -> feature_net.DemoFeatureNet:
  """The demo's feature net from its converted folder (``meta.json`` kind
  ``demo_feature_net``: ``sfd_jax.checkpoint.export.export_converted``)."""
  params, meta = common.load_params(directory, NETWORKS["feature_net"][2])
  if "config" not in meta:
    raise common.ConversionError(f"{directory}: meta.json has no 'config' entry")
  net = feature_net.DemoFeatureNet(
      common.config_from_json(meta["config"], feature_net.FeatureNetConfig), rngs=nnx.Rngs(0))
  common.assign(net, params, name=os.fspath(directory))
  return net
