"""Feature networks for FID-style metrics, by name: ``load_extractor(kind, path, ...)``.

Kinds:
  ``inception`` — the FID Inception-v3 (a directory written by ``python -m
  sfd_jax.convert.inception``); numbers comparable to the ADM evaluator.
  ``demo`` — the demo's own small feature network (``sfd_jax.models.feature_net``); only
  meaningful on the demo's dataset.
"""
from __future__ import annotations

from sfd_jax.convert import inception, networks
from sfd_jax.metrics import adm

FEATURE_KINDS = ("inception", "demo")


def load_extractor(kind: str, path: str, *, batch_size: int, preprocess: str = "adm",
                   in_sharding=None, field: str = "features") -> adm.FeatureExtractor:
  """A ``FeatureExtractor`` for the network of ``kind`` stored at ``path``."""
  if kind not in FEATURE_KINDS:
    raise ValueError(f"{field}={kind!r}: expected one of {FEATURE_KINDS}")
  if not path:
    raise ValueError(f"{field}={kind!r} needs the network's directory (its *_path field)")
  model = (inception.load_inception(path, preprocess=preprocess) if kind == "inception"
           else networks.load_feature_net(path))
  return adm.FeatureExtractor.from_model(model, batch_size=batch_size, in_sharding=in_sharding)
