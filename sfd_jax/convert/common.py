"""Torch-free helpers shared by every converter.

Reference checkpoints are flat ``{name: array}`` state dicts in PyTorch layouts.
``load_state_dict`` reads them from ``.npz``, ``.safetensors`` or ``.pt/.pth/.ckpt``
files (torch-free, with the restricted unpickler of ``safe_pickle``: no code from the
file runs). ``StateDict`` hands out
arrays by key while checking shapes, so every converter fails with one message that
names the key and both shapes, and can report keys it never used.
``assign`` copies a nested dict of arrays into an NNX module, checking paths and shapes.
``load_model`` and ``converter_main`` are the loader and the command line that the
converters of config-dataclass networks (DINOv2, SemVAE) share.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sfd_jax.core import errors, files, runner, safe_pickle, trees
from sfd_jax.core.errors import ConverterInputError, MissingFileError, OutputExistsError


class ConversionError(ConverterInputError):
  """A reference checkpoint does not match the model it is converted into."""


def _torch_load(path: str, entries: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """A torch file's state dict via the torch-free restricted reader (``safe_pickle``):
  non-tensor objects (an OmegaConf config, argparse Namespace, ...) become inert
  stand-ins and a file that refers to code-running globals is refused."""
  try:
    obj = safe_pickle.load(path)
  except safe_pickle.UnsafePickleError as e:
    raise ConversionError(str(e)) from e
  except errors.UserError:          # a legacy file and no PyTorch: names the extra
    raise
  except Exception as e:  # pylint: disable=broad-except  (bad zip, truncated pickle, EOF)
    text = " ".join(str(e).split())
    text = text if len(text) <= 240 else text[:237] + "..."
    raise ConversionError(f"checkpoint file {path}: not a readable PyTorch file "
                          f"({type(e).__name__}: {text}); expected a (dict of) tensors "
                          "saved with torch.save, or convert it to .npz/.safetensors "
                          "first") from e
  if isinstance(obj, Mapping):
    for entry in (entries or ()):
      if entry in obj and isinstance(obj[entry], Mapping):
        obj = obj[entry]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"checkpoint file {path}: expected a state dict, found {obj!r}")
  out = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      floating = np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"
      out[k] = v.astype(np.float32) if floating else v
  return out


def load_state_dict(path: str | os.PathLike, entries: Iterable[str] | None = None,
                    prefix: str = "") -> dict[str, np.ndarray]:
  """Reads a flat state dict.

  Args:
    path: ``.npz`` (named arrays; a ``config`` entry and ``in/``/``out/`` entries are
      ignored), ``.safetensors``, or ``.pt/.pth/.ckpt`` (torch's zip format, read without
      torch by ``safe_pickle.load``: other objects in the file — a training config, an
      optimizer state — become inert stand-ins, and the file can never run code).
    entries: for torch files holding several dicts (``{"model":…, "ema":…}``), the
      entry names to try in order (first one present wins).
    prefix: keep only keys starting with this prefix, with the prefix removed. Without
      one, ``.npz`` keys containing "/" (a second network of a fixture) are skipped.

  Raises:
    MissingFileError: no file at ``path``.
    ConversionError: the file cannot be read as a state dict (naming it and why).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise MissingFileError(f"checkpoint file not found: {path}")
  if os.path.isdir(path):
    raise ConversionError(f"{path} is a directory; give a reference checkpoint file "
                          "(.pt/.pth/.ckpt, .npz or .safetensors)")
  if path.endswith(".npz"):
    sd = files.load_npz(path, what="checkpoint file", error=ConversionError)
    sd = {k: v for k, v in sd.items() if k != "config" and not k.startswith(("in/", "out/"))}
  elif path.endswith(".safetensors"):
    sd = files.load_safetensors(path, what="checkpoint file", error=ConversionError)
  elif path.endswith(files.TORCH_SUFFIXES):
    sd = _torch_load(path, entries)
  else:
    raise ConversionError(f"{path}: unknown checkpoint format (expected .npz, .safetensors, "
                          ".pt, .pth or .ckpt)")
  if prefix:
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  elif path.endswith(".npz"):
    # Fixture-style archives keep a second network under "name/..." (PyTorch state-dict
    # keys never contain "/"): without a prefix, the main network is the "/"-free keys.
    sd = {k: v for k, v in sd.items() if "/" not in k}
  return sd


class StateDict:
  """A reference state dict that tracks which keys were consumed."""

  def __init__(self, sd: Mapping[str, Any], name: str = "checkpoint",
               ignore_prefixes: Iterable[str] = ()):
    self._sd = {k: np.asarray(v) for k, v in sd.items()}
    self._used: set[str] = set()
    self.name = name
    self._ignore = tuple(ignore_prefixes)

  def __contains__(self, key: str) -> bool:
    return key in self._sd

  def keys(self):
    return self._sd.keys()

  def get(self, key: str, shape: tuple[int, ...] | None = None,
          dtype=np.float32) -> np.ndarray:
    if key not in self._sd:
      raise ConversionError(f"{self.name}: missing key '{key}'"
                            + (f" (expected shape {tuple(shape)})" if shape else ""))
    arr = self._sd[key]
    if shape is not None and tuple(arr.shape) != tuple(shape):
      raise ConversionError(f"{self.name}: key '{key}' has shape {tuple(arr.shape)}, "
                            f"expected {tuple(shape)}")
    self._used.add(key)
    return arr.astype(dtype) if dtype is not None else arr

  def mark_used(self, *keys: str) -> None:
    self._used.update(k for k in keys if k in self._sd)

  def linear(self, prefix: str, in_dim: int, out_dim: int, bias: bool = True):
    """nn.Linear (out, in) -> {'kernel': (in, out), 'bias': (out,)}."""
    out = {"kernel": self.get(f"{prefix}.weight", (out_dim, in_dim)).T}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias", (out_dim,))
    return out

  def conv(self, prefix: str, in_ch: int, out_ch: int, kh: int, kw: int, bias: bool = True):
    """nn.Conv2d (out, in, kh, kw) -> {'kernel': HWIO, 'bias': (out,)}."""
    w = self.get(f"{prefix}.weight", (out_ch, in_ch, kh, kw))
    out = {"kernel": w.transpose(2, 3, 1, 0)}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias", (out_ch,))
    return out

  def norm(self, prefix: str, dim: int, bias: bool = True):
    """LayerNorm / GroupNorm / RMSNorm weight (and bias) -> {'scale', 'bias'}."""
    out = {"scale": self.get(f"{prefix}.weight", (dim,))}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias", (dim,))
    return out

  def unused(self) -> list[str]:
    return sorted(k for k in self._sd
                  if k not in self._used and not k.startswith(self._ignore))

  def check_all_used(self) -> None:
    extra = self.unused()
    if extra:
      shown = ", ".join(f"'{k}' {tuple(self._sd[k].shape)}" for k in extra[:10])
      more = f" and {len(extra) - 10} more" if len(extra) > 10 else ""
      raise ConversionError(f"{self.name}: unexpected keys {shown}{more}")


def assign(module, params: Mapping[str, Any], name: str = "checkpoint",
           variables=None) -> None:
  """Copies a nested dict of arrays into ``module``'s ``nnx.Param`` variables.

  Every parameter of the module must be given, with its exact shape; the array is
  cast to the parameter's dtype. Raises ConversionError naming the path otherwise.
  ``variables`` is an optional NNX filter selecting other variable types to fill
  (default ``nnx.Param``; e.g. ``(nnx.Param, nnx.BatchStat)`` for frozen BatchNorm).
  """

  state = nnx.state(module, nnx.Param if variables is None else variables)
  flat_state = dict(nnx.to_flat_state(state))
  flat_given = {tuple(str(p) for p in k): v for k, v in trees.flatten(params, None).items()}
  flat_state_s = {tuple(str(p) for p in k): (k, v) for k, v in flat_state.items()}
  missing = sorted(set(flat_state_s) - set(flat_given))
  extra = sorted(set(flat_given) - set(flat_state_s))
  if missing:
    raise ConversionError(f"{name}: no value for parameter(s) "
                          + ", ".join("/".join(m) for m in missing[:10]))
  if extra:
    raise ConversionError(f"{name}: converted arrays match no parameter: "
                          + ", ".join("/".join(m) for m in extra[:10]))
  for key, (_, var) in flat_state_s.items():
    arr = np.asarray(flat_given[key])
    cur = var.get_value()
    if tuple(arr.shape) != tuple(cur.shape):
      raise ConversionError(f"{name}: parameter {'/'.join(key)} has shape "
                            f"{tuple(cur.shape)}, converted array has {tuple(arr.shape)}")
    var.set_value(jnp.asarray(arr, dtype=cur.dtype))


def save_params(directory: str | os.PathLike, params: Mapping[str, Any],
                meta: Mapping[str, Any] | None = None, force: bool = False) -> str:
  """Writes converted weights as a standalone Orbax checkpoint plus ``meta.json``.

  Layout: ``directory/params`` (Orbax PyTree of the nested dict) and
  ``directory/meta.json`` (model kind, config, source file). Refuses to overwrite an
  existing directory unless ``force``.
  """

  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and os.listdir(directory) and not force:
    raise OutputExistsError(f"{directory} exists and is not empty; pass --force (force=True) "
                            "to overwrite it, or choose another destination")
  os.makedirs(directory, exist_ok=True)
  tree = trees.to_numpy(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), tree, force=force)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(dict(meta or {}), f, indent=2, sort_keys=True, default=str)
  return directory


# meta.json "kind" -> what the folder holds, in words
KIND_NAMES = {
    "lightning_dit": "a converted LightningDiT (SFD denoiser)",
    "texture_vae": "a converted texture VAE",
    "semantic_vae": "a converted Semantic VAE (SemVAE)",
    "dinov2": "a converted DINOv2",
    "lpips": "a converted LPIPS network",
    "inception_v3_fid": "a converted FID Inception",
    "demo_feature_net": "a converted demo feature net",
}


def meta_kind(meta: Mapping[str, Any]) -> str | None:
  """The network a converted folder's ``meta.json`` names (``"kind"``; older folders
  wrote ``"model"``)."""
  return meta.get("kind", meta.get("model"))


def kind_name(kind: str | None) -> str:
  """``"a converted texture VAE folder (meta.json kind 'texture_vae')"``."""
  if kind is None:
    return "a converted folder whose meta.json names no network"
  return f"{KIND_NAMES.get(kind, 'a converted network')} folder (meta.json kind {kind!r})"


def describe_folder(path: str | os.PathLike) -> str | None:
  """What a folder that is not a converted one holds, in words (None: nothing known)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return None
  names = set(os.listdir(path))
  ckdir = os.path.join(path, "checkpoints") if "checkpoints" in names else path
  if os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir)):
    return "a training run (checkpoints/<step>)"
  for name, what in (("dataset.json", "an encoded latent dataset (dataset.json)"),
                     ("features.json", "a feature dataset (features.json)"),
                     ("sample_info.json", "a sampling workdir (sample_info.json)")):
    if name in names:
      return what
  if not names:
    return "an empty folder"
  return None


def wrong_kind(where: str, found: str | None, expected: str) -> ConversionError:
  """``<where> is a converted texture VAE folder (...), but a converted DINOv2 is
  expected``: the folder of another network."""
  want = KIND_NAMES.get(expected, f"a converted {expected!r}")
  return ConversionError(f"{where} is {kind_name(found)}, but {want} folder is expected "
                         "here; point it at one (python -m sfd_jax.convert.<network> or "
                         "python -m sfd_jax.checkpoint.export)")


def _not_converted(directory: str, where: str) -> MissingFileError:
  what = describe_folder(directory)
  return MissingFileError(f"{where}: not a converted checkpoint (no 'params' folder"
                          + (f"; it is {what}" if what else "") + "); write one with "
                          "python -m sfd_jax.convert.<network>"
                          + (" or export the run with python -m sfd_jax.checkpoint.export"
                             if what and what.startswith("a training run") else ""))


def load_params(directory: str | os.PathLike, kind: str | None = None,
                strict: bool = True) -> tuple[dict, dict]:
  """Reads what ``save_params`` wrote: (nested params dict of numpy arrays, meta).

  ``kind``: the network the directory must hold (``meta.json``'s ``"kind"``; the older
  ``"model"`` key is read too). A different kind is an error naming both; a directory
  without any kind is an error too unless ``strict=False``.
  """

  directory = os.path.abspath(os.fspath(directory))
  ppath = os.path.join(directory, "params")
  if not os.path.isdir(ppath):
    if not os.path.exists(directory):
      raise MissingFileError(f"converted checkpoint {directory} not found")
    raise _not_converted(directory, directory)
  meta = {}
  mpath = os.path.join(directory, "meta.json")
  if os.path.exists(mpath):
    meta = files.read_json(mpath, what="converted checkpoint metadata",
                           error=ConversionError)
  if kind is not None:
    found = meta_kind(meta)
    if found != kind and (strict or found is not None):
      raise wrong_kind(directory, found, kind)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(ppath)
  except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore errors)
    err = errors.as_resource_error(e, where=directory)
    if err is not None:
      raise err from e
    raise ConversionError(f"converted checkpoint {directory}: its 'params' cannot be read "
                          f"({errors.reason(e)}); convert or export it again") from e
  return trees.to_numpy(tree), meta


def check_converted_dir(directory: str | os.PathLike, kind: str | None = None,
                        field: str = "") -> dict:
  """Checks, without reading the weights, that ``directory`` is a converted-weights
  folder (``params/`` + readable ``meta.json``) of ``kind``; returns the meta.

  Errors (``MissingFileError`` / ``ConversionError``) name ``field`` and the folder.
  """
  where = f"{field}={os.fspath(directory)!r}" if field else os.fspath(directory)
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise MissingFileError(f"{where}: no such directory (expected a converted checkpoint "
                           "folder written by python -m sfd_jax.convert.<network>)")
  if not os.path.isdir(os.path.join(directory, "params")):
    raise _not_converted(directory, where)
  mpath = os.path.join(directory, "meta.json")
  meta = (files.read_json(mpath, what="converted checkpoint metadata", error=ConversionError)
          if os.path.exists(mpath) else {})
  found = meta_kind(meta)
  if kind is not None and found is not None and found != kind:
    raise wrong_kind(where, found, kind)
  return meta


def abstract_model(model_cls, config, dtype=None):
  """``model_cls(config, rngs=…, dtype=dtype)`` with unallocated parameters, for ``assign``."""
  return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype))


def load_model(path: str | os.PathLike, config, *, kind: str, config_cls,
               default_config: Callable[[], Any], convert: Callable[..., dict],
               build: Callable[[Any], Any],
               read: Callable[[str], Mapping[str, Any]] = load_state_dict):
  """Builds a model holding the weights of ``path``.

  ``path`` is either a directory written by a converter CLI (``save_params``; its
  ``meta.json`` supplies the config as ``config_cls(**meta["config"])`` when ``config`` is
  None) or a reference checkpoint file: ``read(path)`` → ``convert(state_dict, config,
  name=path)``, with ``config`` defaulting to ``default_config()``. ``build(config)``
  makes the (abstract) model the parameters are assigned to.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    params, meta = load_params(path, kind, strict=False)
    if config is None:
      config = config_cls(**meta["config"]) if "config" in meta else default_config()
  else:
    config = config or default_config()
    params = convert(read(path), config, name=path)
  model = build(config)
  assign(model, params, name=path)
  return model


def read_json_arg(text_or_path: str) -> dict:
  """A JSON object given inline or as a file (``.yaml``/``.yml`` needs PyYAML)."""
  if os.path.isfile(text_or_path):
    with open(text_or_path) as f:
      text = f.read()
    if text_or_path.endswith((".yaml", ".yml")):
      import yaml  # pylint: disable=import-outside-toplevel
      return dict(yaml.safe_load(text))
    return dict(json.loads(text))
  return dict(json.loads(text_or_path))


def config_from_json(fields: Mapping[str, Any], config_cls,
                     from_reference: Callable[[dict], Any] | None = None):
  """``config_cls(**fields)`` when every key is a field of ``config_cls``; otherwise the
  reference constructor's arguments through ``from_reference``."""
  names = {f.name for f in dataclasses.fields(config_cls)}
  if set(fields) <= names:
    return config_cls(**{k: (tuple(v) if isinstance(v, list) else v)
                         for k, v in fields.items()})
  if from_reference is None:
    raise ConversionError(f"--config-json: unknown fields {sorted(set(fields) - names)} "
                          f"(fields of {config_cls.__name__}: {sorted(names)})")
  return from_reference(dict(fields))


def converter_main(argv: Sequence[str] | None, *, kind: str, prog: str, description: str,
                   src_help: str, presets: Sequence[str], default_preset: str, config_cls,
                   convert: Callable[..., dict],
                   read: Callable[[argparse.Namespace], Mapping[str, Any]] | None = None,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   extra_meta: Mapping[str, Any] | None = None,
                   from_reference: Callable[[dict], Any] | None = None,
                   reference_help: str = "") -> str:
  """The converter command line: ``--src --dst [--preset | --config-json] [--force]``
  (+ ``add_arguments``).

  Converts ``read(args)`` (default: ``load_state_dict(args.src)``) for
  ``config_cls.preset(args.preset)`` — or, with ``--config-json`` (inline JSON or a
  file), for ``config_cls(**fields)`` / ``from_reference(fields)`` (the reference
  constructor's argument names) — and writes it with ``save_params``; ``meta.json``
  holds the kind, preset, config, source path and ``extra_meta``. Returns the directory.
  """
  parser = runner.ArgumentParser(prog=prog, description=description)
  parser.add_argument("--src", required=True, help=src_help)
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--preset", default=default_preset, choices=list(presets))
  parser.add_argument("--config-json", default=None,
                      help=f"architecture beyond the presets: JSON (inline or a file) of "
                           f"{config_cls.__name__} fields or of the reference constructor's "
                           f"arguments{reference_help}; replaces --preset")
  parser.add_argument("--force", action="store_true", help="overwrite a non-empty --dst")
  if add_arguments is not None:
    add_arguments(parser)
  args = parser.parse_args(argv)
  if args.config_json:
    config = config_from_json(read_json_arg(args.config_json), config_cls, from_reference)
    args.preset = "custom"
  else:
    config = config_cls.preset(args.preset)
  state_dict = read(args) if read is not None else load_state_dict(args.src)
  params = convert(state_dict, config, name=args.src)
  meta = {"model": kind, "preset": args.preset, "config": dataclasses.asdict(config),
          "source": os.path.abspath(args.src), **(extra_meta or {})}
  out = save_params(args.dst, params, meta=meta, force=args.force)
  print(f"wrote {out}")
  return out
