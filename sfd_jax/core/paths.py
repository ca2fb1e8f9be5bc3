"""Paths that may be local or URLs (``gs://bucket/run``)."""
from __future__ import annotations

import os


def abspath(path: str) -> str:
  """Absolute local path; URLs such as ``gs://bucket/run`` are left unchanged."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def makedirs(path: str) -> None:
  """``mkdir -p`` for local paths and (through etils/epath) ``gs://`` URLs."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  epath.Path(path).mkdir(parents=True, exist_ok=True)
