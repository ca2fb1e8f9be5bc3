"""File readers whose every failure names the file (and never suggests unpickling).

``.npz`` (NumPy, ``allow_pickle=False``), ``.safetensors``, ``.pt/.pth/.ckpt`` (PyTorch,
``weights_only=True``, only when torch is installed) and JSON files. A missing file is a
``MissingFileError``; a file that is not what it should be (truncated, random bytes,
pickled objects, wrong format) is ``error`` (a ``UserError`` subclass chosen by the
caller, ``DataError`` by default) with the path, what was expected and the reason.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any, Iterable, Mapping

import numpy as np

from sfd_jax.core import safe_pickle
from sfd_jax.core.errors import DataError, MissingFileError, UserError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _exists(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise MissingFileError(f"{what} {path} not found")
  if os.path.isdir(path):
    raise MissingFileError(f"{what} {path} is a directory, expected a file")


def _npz_reason(path: str, e: BaseException) -> str:
  text = str(e)
  if "pickle" in text:
    if zipfile.is_zipfile(path):
      return "it holds Python objects instead of plain arrays (never loaded: unsafe)"
    return "not an .npz archive (neither a zip of .npy arrays nor a .npy array)"
  if isinstance(e, (zipfile.BadZipFile, EOFError)) or "zip" in text.lower():
    return f"truncated or not an .npz archive ({type(e).__name__}: {text})"
  return f"unreadable ({type(e).__name__}: {text})"


_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
               TypeError)


def load_npz(path: str | os.PathLike, *, what: str = "array file",
             keys: Iterable[str] | None = None, error: type[UserError] = DataError
             ) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file (all, or those of ``keys`` that it has)."""
  path = os.fspath(path)
  _exists(path, what)
  try:
    with np.load(path, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise error(f"{what} {path}: a single .npy array, expected an .npz archive")
      names = list(z.files) if keys is None else [k for k in keys if k in z.files]
      return {k: z[k] for k in names}
  except UserError:
    raise
  except _NPZ_ERRORS as e:
    raise error(f"{what} {path}: {_npz_reason(path, e)}") from e


def npz_names(path: str | os.PathLike, *, what: str = "array file",
              error: type[UserError] = DataError) -> list[str]:
  """Names of the arrays of an ``.npz`` file, without reading them."""
  path = os.fspath(path)
  _exists(path, what)
  try:
    with zipfile.ZipFile(path, "r") as zf:
      return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise error(f"{what} {path}: {_npz_reason(path, e)}") from e


def _safetensors_reason(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return (f"not a valid .safetensors file ({text}); expected a safetensors header and "
          "tensors (truncated or another format?)")


def load_safetensors(path: str | os.PathLike, *, what: str = "tensor file",
                     error: type[UserError] = DataError) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file as NumPy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  _exists(path, what)
  try:
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError, ...)
    raise error(f"{what} {path}: {_safetensors_reason(e)}") from e


def safetensors_shapes(path: str | os.PathLike, *, what: str = "tensor file",
                       error: type[UserError] = DataError
                       ) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{key: (shape, dtype)}`` of a ``.safetensors`` file, from its header only."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  _exists(path, what)
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
              for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise error(f"{what} {path}: {_safetensors_reason(e)}") from e


def torch_load(path: str | os.PathLike, *, what: str = "PyTorch file",
               error: type[UserError] = DataError, alternative: str = "") -> Any:
  """A ``torch.save`` file without PyTorch (``core.safe_pickle``: tensors as NumPy
  arrays, no code from the file runs); errors name the file. Only a legacy (pre-1.6,
  non-zip) file needs PyTorch (the ``torch`` extra).

  ``alternative``: how to do without the file's format (appended to a read failure).
  """
  path = os.fspath(path)
  _exists(path, what)
  try:
    return safe_pickle.load(path)
  except UserError:                 # a legacy file and no PyTorch: names the extra
    raise
  except Exception as e:  # pylint: disable=broad-except  (refused global, bad zip, EOF)
    text = " ".join(str(e).split())
    if len(text) > 240:
      text = text[:237] + "..."
    raise error(f"{what} {path}: not a readable PyTorch weights file ({type(e).__name__}: "
                f"{text}); expected a (dict of) tensors saved with torch.save"
                f"{'; ' + alternative if alternative else ''}") from e


def read_json(path: str | os.PathLike, *, what: str = "JSON file",
              error: type[UserError] = DataError, expect: type | None = dict) -> Any:
  """A JSON file (an object by default); errors name the file."""
  path = os.fspath(path)
  _exists(path, what)
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise error(f"{what} {path}: not valid JSON ({e}); restore the file or rewrite it") from e
  if expect is not None and not isinstance(obj, expect):
    raise error(f"{what} {path}: expected a JSON {expect.__name__}, found "
                f"{type(obj).__name__}")
  return obj


def read_array_file(path: str | os.PathLike, *, what: str = "array file",
                    error: type[UserError] = DataError, entries: Iterable[str] = (),
                    alternative: str = "") -> Mapping[str, Any]:
  """``.npz`` / ``.safetensors`` / PyTorch file → ``{name: array or tensor}``.

  For PyTorch files holding several dicts, the first of ``entries`` that is a dict wins.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    return load_npz(path, what=what, error=error)
  if path.endswith(".safetensors"):
    return load_safetensors(path, what=what, error=error)
  if path.endswith(TORCH_SUFFIXES):
    obj = torch_load(path, what=what, error=error, alternative=alternative)
    if isinstance(obj, Mapping):
      for entry in entries:
        if entry in obj and isinstance(obj[entry], Mapping):
          obj = obj[entry]
          break
    if not isinstance(obj, Mapping):
      raise error(f"{what} {path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj
  _exists(path, what)
  raise error(f"{what} {path}: unknown format (expected .npz, .safetensors or "
              f"{'/'.join(TORCH_SUFFIXES)})")
