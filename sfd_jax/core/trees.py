"""Nested parameter dicts: flattening, to NumPy, shape checks."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def flatten(tree: Mapping[Any, Any], sep: str | None = "/") -> dict[Any, Any]:
  """``{path: leaf}`` of a nested mapping, in insertion order; a path is the keys joined
  with ``sep`` (``"a/b/c"``), or their tuple with ``sep=None``. An empty mapping is a
  leaf."""
  out: dict[Any, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      path = prefix + (k,)
      if isinstance(v, Mapping) and v:
        walk(v, path)
      else:
        out[path if sep is None else sep.join(map(str, path))] = v
  walk(tree, ())
  return out


def to_numpy(tree: Mapping[Any, Any]) -> dict:
  """Nested mapping of arrays → nested dict (string keys) of NumPy arrays."""
  return {str(k): (to_numpy(v) if isinstance(v, Mapping) else np.asarray(v))
          for k, v in tree.items()}


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
