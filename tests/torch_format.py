"""Writing files in ``torch.save``'s zip format without PyTorch (for the reader tests).

The archive holds ``<name>/data.pkl`` (protocol-2 pickle), ``<name>/data/<key>`` (raw
little-endian storage bytes), ``<name>/byteorder`` and ``<name>/version`` — as torch
2.x writes them. Tensors pickle as ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, OrderedDict())`` with persistent ids ``("storage",
torch.<X>Storage, key, "cpu", numel)``. ``Global`` / ``NewObj`` / ``Reduce`` write
arbitrary globals, ``NEWOBJ``+``BUILD`` and ``REDUCE``+``BUILD`` sequences, e.g. the ones an
OmegaConf ``DictConfig`` pickles to, without the classes being importable.
"""
import collections
import io
import os
import pickle
import zipfile

import numpy as np

_STORAGE = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
            "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
            "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
            "bool": "BoolStorage"}


class Global:
  """A reference to ``module.name`` written as a GLOBAL opcode (never imported)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):     # pickle's save_reduce wants a callable
    raise TypeError("a marker")


class NewObj:
  """``cls.__new__(cls, *args)`` then ``BUILD(state)``, as protocol 2 pickles objects."""

  def __init__(self, cls: Global, args=(), state=None):
    self.cls, self.args, self.state = cls, tuple(args), state


class Reduce:
  """``func(*args)`` then ``BUILD(state)`` when a state is given."""

  def __init__(self, func: Global, args=(), state=None):
    self.func, self.args, self.state = func, tuple(args), state


class Tensor:
  """A NumPy array saved as a torch tensor (optionally a strided view of ``base``)."""

  def __init__(self, array, base=None, offset=0, stride=None):
    self.array = np.asarray(array)
    contiguous = np.array(self.array, order="C")      # keeps 0-d arrays 0-d
    self.base = base if base is not None else _Storage(contiguous)
    self.offset = offset
    self.stride = stride if stride is not None else tuple(
        s // self.array.itemsize for s in contiguous.strides)

  def __reduce_ex__(self, protocol):
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (self.base, self.offset, tuple(self.array.shape), tuple(self.stride), False,
             collections.OrderedDict()))


class _Storage:
  def __init__(self, flat: np.ndarray):
    self.flat = np.ascontiguousarray(flat).reshape(-1)


def storage_of(array) -> _Storage:
  """A storage several ``Tensor`` views can share."""
  return _Storage(np.asarray(array))


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  def __init__(self, f):
    super().__init__(f, protocol=2)
    self.storages: dict[int, tuple[str, _Storage]] = {}

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      if id(obj) not in self.storages:
        self.storages[id(obj)] = (str(len(self.storages)), obj)
      key = self.storages[id(obj)][0]
      return ("storage", Global("torch", _STORAGE[obj.flat.dtype.name]), key, "cpu",
              int(obj.flat.size))
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    if isinstance(obj, (NewObj, Reduce)):
      if isinstance(obj, NewObj):
        self.save(obj.cls)
        self.save(obj.args)
        self.write(pickle.NEWOBJ)
      else:
        self.save(obj.func)
        self.save(obj.args)
        self.write(pickle.REDUCE)
      if obj.state is not None:
        self.save(obj.state)
        self.write(pickle.BUILD)
      return
    super().save(obj, save_persistent_id)


def dumps(obj) -> tuple[bytes, dict[str, bytes]]:
  """(data.pkl bytes, {storage key: raw bytes})."""
  buf = io.BytesIO()
  p = _Pickler(buf)
  p.dump(obj)
  return buf.getvalue(), {k: s.flat.astype(s.flat.dtype.newbyteorder("<")).tobytes()
                          for k, s in p.storages.values()}


def save(obj, path, name: str = "archive") -> str:
  """Writes ``obj`` (with ``Tensor`` leaves) as a torch zip archive."""
  pkl, storages = dumps(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{name}/data.pkl", pkl)
    zf.writestr(f"{name}/byteorder", "little")
    for key, raw in storages.items():
      zf.writestr(f"{name}/data/{key}", raw)
    zf.writestr(f"{name}/version", "3\n")
  return os.fspath(path)


def tensors(state_dict):
  """{name: array} → ordered {name: Tensor}."""
  return collections.OrderedDict((k, Tensor(v)) for k, v in state_dict.items())


def omegaconf_like(tree, key=None):
  """What an OmegaConf DictConfig / ListConfig / AnyNode of ``tree`` pickles to:
  NEWOBJ of the omegaconf class, BUILD with ``_metadata`` (a ContainerMetadata with
  ``typing.Any`` / ``builtins.dict`` references) and ``_content`` nodes."""
  def meta(cls, **kw):
    return NewObj(Global("omegaconf.base", cls), (), {
        "ref_type": Global("typing", "Any"), "optional": True, "key": key, "flags": {},
        "flags_root": False, "resolver_cache": Reduce(
            Global("collections", "defaultdict"), (Global("builtins", "dict"),)), **kw})
  if isinstance(tree, dict):
    return NewObj(Global("omegaconf.dictconfig", "DictConfig"), (), {
        "_metadata": meta("ContainerMetadata", object_type=Global("builtins", "dict"),
                          key_type=Global("typing", "Any"),
                          element_type=Global("typing", "Any")),
        "_parent": None,
        "_content": {k: omegaconf_like(v, k) for k, v in tree.items()}})
  if isinstance(tree, list):
    return NewObj(Global("omegaconf.listconfig", "ListConfig"), (), {
        "_metadata": meta("ContainerMetadata", object_type=Global("builtins", "list")),
        "_parent": None, "_content": [omegaconf_like(v, i) for i, v in enumerate(tree)]})
  return NewObj(Global("omegaconf.nodes", "AnyNode"), (), {
      "_metadata": meta("Metadata", object_type=None), "_parent": None, "_val": tree})


# ------------------------------------------------------------ "malicious" payloads


def write_marker(path):
  """Creates ``path`` — a stand-in for any code a pickle could run."""
  with open(path, "w") as f:
    f.write("ran")


class MarkerOnSetstate:
  """A class whose ``__setstate__`` (BUILD) writes a marker file."""

  def __setstate__(self, state):
    write_marker(state["marker"])


class OsSystem:
  """Pickles to ``os.system(command)`` (the classic payload)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class Exec:
  """Pickles to ``builtins.exec(code)``."""

  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    return (exec, (self.code,))


class CallFunction:
  """Pickles to ``tests.torch_format.write_marker(path)``: an importable function that
  is on no deny-list, so only the stand-in mechanism keeps it from running."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (write_marker, (self.path,))
