"""Optional packages: imported where a feature needs them, one line when one is missing.

  wandb = optional.require("wandb", extra="wandb", purpose="config.wandb.enabled=True")

A missing package is a ``MissingPackageError`` (a ``UserError``, also an ``ImportError``):
the entry points print it as one line naming what needed it and the extra of
``pyproject.toml`` that installs it, e.g.::

  main.py: missing package: --mode=demo needs scikit-learn (sklearn), which is not
  installed: pip install -e '.[demo]' (the 'demo' extra)

The extras: ``demo`` (scikit-learn, matplotlib), ``wandb``, ``tf`` (TensorFlow, clu,
TensorFlow Datasets), ``torch`` (PyTorch, for legacy ``.pt`` files and trusted pickles).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from sfd_jax.core.errors import UserError

# import name -> the name pip installs it under (where they differ)
PIP_NAMES = {"sklearn": "scikit-learn", "tensorflow_datasets": "tensorflow-datasets",
             "tensorflow": "tensorflow-cpu", "PIL": "pillow"}


class MissingPackageError(UserError, ImportError):
  """An optional package a feature needs is not installed."""
  kind = "missing package"


def missing(module: str, *, extra: str, purpose: str, alternative: str = "",
            cause: BaseException | None = None) -> MissingPackageError:
  """The one-line error for ``module`` missing (``cause``: the ImportError seen)."""
  top = module.split(".")[0]
  pip_name = PIP_NAMES.get(top, top)
  name = pip_name if pip_name == top else f"{pip_name} ({top})"
  status = "which is not installed"
  if isinstance(cause, ImportError) and cause.name and cause.name.split(".")[0] != top:
    status = f"which does not import (no module named {cause.name!r})"
  return MissingPackageError(
      f"{purpose} needs {name}, {status}: pip install -e "
      f"'.[{extra}]' in the repository (the '{extra}' extra)"
      + (f", {alternative}" if alternative else ""))


def require(module: str, *, extra: str, purpose: str, alternative: str = "") -> ModuleType:
  """``importlib.import_module(module)``, or ``MissingPackageError`` naming ``extra``.

  Args:
    module: the import name (``"sklearn.datasets"``, ``"wandb"``).
    extra: the ``pyproject.toml`` extra that installs it (``"demo"``).
    purpose: what needs it, as the user asked for it (``"--mode=demo"``).
    alternative: how to do without it (appended: ``"or set --config.writer=tensorboardx"``).
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise missing(module, extra=extra, purpose=purpose, alternative=alternative,
                  cause=e) from e
