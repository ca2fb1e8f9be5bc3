"""Nested parameter dicts: to NumPy, leaves with paths, shape checks."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np


def to_numpy(tree: Mapping[Any, Any]) -> dict:
  """Nested mapping of arrays → nested dict (string keys) of NumPy arrays."""
  return {str(k): (to_numpy(v) if isinstance(v, Mapping) else np.asarray(v))
          for k, v in tree.items()}


def leaves(tree: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  """``("a/b/c", leaf)`` for every leaf of a nested mapping, in insertion order."""
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      yield from leaves(v, path + "/")
    else:
      yield path, v


def check_shapes(params: Mapping[str, Any], abstract: Mapping[str, Any], name: str,
                 prefix: str = "", error: type[Exception] = ValueError) -> None:
  """Raises ``error`` unless ``params`` has exactly the paths and shapes of ``abstract``."""
  if set(params) != set(abstract):
    raise error(f"{name}: parameter names {sorted(params)} under '{prefix or '/'}' do not "
                f"match the model's {sorted(abstract)}")
  for k, a in abstract.items():
    if isinstance(a, Mapping):
      check_shapes(params[k], a, name, f"{prefix}{k}/", error)
    elif tuple(params[k].shape) != tuple(a.shape):
      raise error(f"{name}: '{prefix}{k}' has shape {tuple(params[k].shape)}, the model "
                  f"expects {tuple(a.shape)}")
