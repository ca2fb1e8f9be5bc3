"""Paths that may be local or URLs (``gs://bucket/run``)."""
from __future__ import annotations

import os


def abspath(path: str) -> str:
  """Absolute local path; URLs such as ``gs://bucket/run`` are left unchanged."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def package_root(path: str) -> str:
  """The directory above the Python package holding the file ``path`` (the repository
  for ``configs/x.py``, whose config does ``from configs import common``); the file's own
  directory when it is in no package."""
  root = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(root, "__init__.py")):
    root = os.path.dirname(root)
  return root


def makedirs(path: str) -> None:
  """``mkdir -p`` for local paths and (through etils/epath) ``gs://`` URLs."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  epath.Path(path).mkdir(parents=True, exist_ok=True)
