"""Reading PyTorch ``.pt`` / ``.pth`` / ``.ckpt`` files without PyTorch and without
running any code from the file.

A ``torch.save`` file (format of torch >= 1.6) is a zip archive: ``<name>/data.pkl`` is a
pickle whose tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` calls on *persistent ids* ``("storage", torch.FloatStorage, key, location,
numel)``; the bytes of storage ``key`` are the archive member ``<name>/data/<key>``
(little-endian unless ``<name>/byteorder`` says otherwise).

``load`` unpickles ``data.pkl`` with a restricted unpickler:

* an allow-list of globals is mapped to *our own* functions and markers: the tensor and
  parameter rebuild functions (they return NumPy arrays read from the storage bytes,
  after checking offset, sizes and strides against the storage), the storage types (which
  only name a dtype), torch dtypes, ``collections.OrderedDict`` and a few pure data
  constructors (``tuple``, ``list``, ``dict``, ``set``, ``frozenset``, ``complex``);
* every other global (an OmegaConf ``DictConfig``, an ``argparse.Namespace``, a
  Lightning hyper-parameter object, ...) becomes an inert *stand-in* class: calling it,
  ``NEWOBJ`` on it and ``BUILD`` on its instances only record the arguments and state;
  no constructor, ``__reduce__`` callable, ``__setstate__`` or import of the file's
  choosing is ever executed;
* globals that no checkpoint needs and that exist to run code (``os.system``,
  ``subprocess.*``, ``builtins.eval`` / ``exec`` / ``__import__`` / ``getattr``, ...) make
  the whole file be refused with ``UnsafePickleError`` — nothing from it ran.

The stand-ins keep what the file said (``StandIn.global_name``, ``.args``, ``.state``) so
configs can be inspected, but they are plain data. Legacy (pre-1.6, non-zip) files are
read with ``torch.load(weights_only=True)`` when PyTorch is installed, else refused.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from typing import Any

import numpy as np

from sfd_jax.core import optional


class UnsafePickleError(pickle.UnpicklingError):
  """The file references a global that only code-running pickles use; refused."""


# --------------------------------------------------------------------- stand-ins


class StandIn:
  """An inert stand-in for an object of a class the reader does not allow.

  ``global_name`` is "module.name" of the class (or callable) the file referred to;
  ``args``/``kwargs`` what it was called (or ``NEWOBJ``-ed) with, ``state`` what
  ``BUILD`` gave it, ``items`` / ``list_items`` what ``SETITEMS`` / ``APPENDS`` added.
  """
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    d = object.__getattribute__(obj, "__dict__")
    d.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
    return obj

  def __init__(self, *args, **kwargs):   # never the real constructor
    del args, kwargs

  def __setstate__(self, state):
    self.__dict__["state"] = state

  def __setitem__(self, key, value):
    self.__dict__["items"][key] = value

  def append(self, value):
    self.__dict__["list_items"].append(value)

  def extend(self, values):
    self.__dict__["list_items"].extend(list(values) if isinstance(values, (list, tuple))
                                       else [])

  def __repr__(self):
    return f"<stand-in for {self.global_name}>"


_STAND_INS: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
  """The (cached) stand-in class for global ``module.name``."""
  key = (module, name)
  if key not in _STAND_INS:
    _STAND_INS[key] = type(f"StandIn[{module}.{name}]", (StandIn,),
                           {"global_name": f"{module}.{name}", "__module__": __name__})
  return _STAND_INS[key]


def to_plain(obj: Any, _stack: tuple = ()) -> Any:
  """A plain view of an unpickled object (dicts, lists, scalars, arrays).

  OmegaConf containers and value nodes become their content (``DictConfig`` → dict,
  ``ListConfig`` → list, a node → its value; back-references to parents are dropped);
  any other stand-in becomes ``{"__class__": name, "args": ..., "state": ...}``; a
  stand-in class used as a value becomes its name.
  """
  if id(obj) in _stack:
    return "<cycle>"
  stack = _stack + (id(obj),)
  if isinstance(obj, type) and issubclass(obj, StandIn):
    return obj.global_name
  if isinstance(obj, StandIn):
    d = obj.__dict__
    state = d.get("state")
    if obj.global_name.startswith("omegaconf.") and isinstance(state, dict):
      if "_content" in state:
        return to_plain(state["_content"], stack)
      if "_val" in state:
        return to_plain(state["_val"], stack)
    out = {"__class__": obj.global_name}
    for k in ("args", "kwargs", "state", "items", "list_items"):
      if d.get(k):
        out[k] = to_plain(d[k], stack)
    return out
  if isinstance(obj, dict):
    return {(k if isinstance(k, (str, int, float, bool)) else repr(k)): to_plain(v, stack)
            for k, v in obj.items() if k != "_parent"}
  if isinstance(obj, (list, tuple)):
    return [to_plain(v, stack) for v in obj]
  return obj


# ------------------------------------------------------------------ tensor support


class _StorageType:
  """``torch.<X>Storage`` of a persistent id: only names the element dtype."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


def _bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16",
                 "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool")


class _TorchDtype:
  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """One storage of the archive, read on first use."""

  def __init__(self, reader: "_ArchiveReader", key: str, dtype: np.dtype, numel: int):
    self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel
    self._array = None

  @property
  def array(self) -> np.ndarray:
    if self._array is None:
      raw = self.reader.storage_bytes(self.key)
      dtype = self.dtype.newbyteorder(">") if self.reader.big_endian else self.dtype
      if len(raw) < self.numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {self.key}: {len(raw)} bytes, expected "
                                     f"{self.numel} × {dtype.itemsize}")
      self._array = np.frombuffer(raw, dtype, count=self.numel).astype(self.dtype)
    return self._array


def _ints(name: str, value, allow_empty=True) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise pickle.UnpicklingError(f"tensor {name} must be a tuple of ints, got {value!r}")
  if not allow_empty and not value:
    raise pickle.UnpicklingError(f"tensor {name} is empty")
  return tuple(int(v) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Our ``torch._utils._rebuild_tensor(_v2)``: a NumPy copy of the strided view."""
  del unused
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor storage must be a storage of the archive, got "
                                 f"{type(storage).__name__}")
  size, stride = _ints("size", size), _ints("stride", stride)
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise pickle.UnpicklingError(f"bad tensor storage offset {storage_offset!r}")
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"bad tensor size {size} / stride {stride}")
  data = storage.array
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.numel:
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset "
                                 f"{storage_offset} reaches past its storage of "
                                 f"{storage.numel} elements")
  view = np.lib.stride_tricks.as_strided(
      data[storage_offset:], shape=size, strides=[s * data.itemsize for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _tuple(*args):
  return tuple(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _tuple,
    ("builtins", "tuple"): tuple, ("builtins", "list"): list, ("builtins", "dict"): dict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
}

# Modules / builtins that only a pickle built to run code refers to.
_DENIED_MODULES = {
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket",
    "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty",
    "webbrowser", "multiprocessing", "asyncio", "signal", "threading", "_thread", "io",
    "_io", "pdb", "bdb", "timeit", "cProfile", "profile", "trace", "zipimport", "pkgutil",
    "site", "http", "urllib", "ftplib", "smtplib", "telnetlib",
}
_DENIED_BUILTINS = {
    "eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "exit", "quit",
    "getattr", "setattr", "delattr", "globals", "locals", "vars", "__build_class__",
    "__loader__",
}


def _denied(module: str, name: str) -> bool:
  root = module.split(".")[0]
  if root in _DENIED_MODULES:
    return True
  return root in ("builtins", "__builtin__") and name.split(".")[0] in _DENIED_BUILTINS


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, reader: "_ArchiveReader | None", source: str):
    super().__init__(file)
    self._reader = reader
    self._source = source
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    key = (module, name)
    if key in _ALLOWED:
      return _ALLOWED[key]
    if module == "torch" and name in _STORAGE_DTYPES:
      dt = _STORAGE_DTYPES[name]
      return _StorageType(name, _bfloat16() if dt == "bfloat16" else dt)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    if _denied(module, name):
      raise UnsafePickleError(
          f"{self._source}: refused: the pickle refers to {module}.{name}, which no "
          "checkpoint needs (a file doing so is built to run code). Nothing from the file "
          "was executed.")
    return stand_in(module, name)

  def persistent_load(self, pid):
    if self._reader is None:
      raise pickle.UnpicklingError(f"{self._source}: persistent id {pid!r} outside a "
                                   "torch archive")
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: storage {key!r} has an unknown type "
                                   f"{storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise pickle.UnpicklingError(f"{self._source}: bad storage id {pid!r}")
    if key not in self._storages:
      self._storages[key] = _Storage(self._reader, key, storage_type.dtype, numel)
    return self._storages[key]


class _ArchiveReader:
  def __init__(self, zf: zipfile.ZipFile, path: str):
    self.zf = zf
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
      raise pickle.UnpicklingError(f"{path}: not a torch archive (found "
                                   f"{len(pkls)} data.pkl entries)")
    self.pkl = pkls[0]
    self.prefix = self.pkl[: -len("data.pkl")]
    names = set(zf.namelist())
    order = self.prefix + "byteorder"
    self.big_endian = order in names and zf.read(order).strip() == b"big"

  def storage_bytes(self, key: str) -> bytes:
    name = f"{self.prefix}data/{key}"
    try:
      return self.zf.read(name)
    except KeyError as e:
      raise pickle.UnpicklingError(f"torch archive has no storage member {name}") from e


def is_torch_zip(path: str | os.PathLike) -> bool:
  return zipfile.is_zipfile(os.fspath(path))


def _is_pickle(path: str) -> bool:
  """Starts like a binary pickle (PROTO 2-5): what a legacy ``torch.save`` file is."""
  with open(path, "rb") as f:
    head = f.read(2)
  return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_opcodes(data: bytes, source: str) -> None:
  """Refuses the extension-registry opcodes: CPython resolves a cached extension code
  without calling ``find_class``, so they could bypass the allow-list."""
  for op, _, _ in pickletools.genops(data):
    if op.name in ("EXT1", "EXT2", "EXT4"):
      raise UnsafePickleError(f"{source}: refused: the pickle uses the copyreg extension "
                              f"registry ({op.name}), which no checkpoint needs. Nothing from "
                              "the file was executed.")


def loads(data: bytes, source: str = "pickle") -> Any:
  """Restricted unpickling of plain pickle bytes (no storages)."""
  _check_opcodes(data, source)
  return _RestrictedUnpickler(io.BytesIO(data), None, source).load()


def load(path: str | os.PathLike) -> Any:
  """The object a ``torch.save`` file holds, with tensors as NumPy arrays and every
  non-allow-listed object as an inert ``StandIn``; runs no code from the file.

  Raises ``UnsafePickleError`` for files that refer to code-running globals.
  """
  path = os.fspath(path)
  if not is_torch_zip(path):
    return _load_legacy(path)
  with zipfile.ZipFile(path) as zf:
    reader = _ArchiveReader(zf, path)
    with zf.open(reader.pkl) as f:
      data = f.read()
    _check_opcodes(data, path)
    return _RestrictedUnpickler(io.BytesIO(data), reader, path).load()


def _load_legacy(path: str) -> Any:
  if not _is_pickle(path):
    raise pickle.UnpicklingError(
        f"{path}: neither a zip archive (torch.save since PyTorch 1.6) nor a pickle; "
        "not a PyTorch file")
  torch = optional.require(
      "torch", extra="torch", purpose=f"{path}: a legacy (pre-1.6, non-zip) PyTorch file",
      alternative="or re-save it with a current PyTorch, or convert it to .safetensors")
  obj = torch.load(path, map_location="cpu", weights_only=True)

  def to_numpy(x):
    if hasattr(x, "detach"):
      x = x.detach().cpu()
      return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    if isinstance(x, dict):
      return type(x)((k, to_numpy(v)) for k, v in x.items())
    return x
  return to_numpy(obj)
