"""LPIPS-VGG weights → ``sfd_jax.models.lpips.LPIPS`` (torch-free except for .pth reading).

Two sources, read weights-only and never downloaded:

* ``--vgg`` torchvision's ImageNet VGG16 state dict (``vgg16-397923af.pth``: keys
  ``features.{0,2,5,...,28}.{weight,bias}``; the ``classifier.*`` keys are ignored) plus
  ``--lin`` the lpips package's head weights (``lpips/weights/v0.1/vgg.pth`` of the PyPI
  wheel, keys ``lin{0..4}.model.1.weight`` of shape (1, C, 1, 1); the same file
  taming-transformers downloads as ``vgg_lpips``, MD5 ``d507d7349b931f0638a25a48a722f98a``);
* ``--src`` one state dict of a whole LPIPS module in the taming / lpips layout
  (``net.slice{1..5}.{i}.{weight,bias}``, ``lin{k}.model.1.weight`` or
  ``lins.{k}.model.1.weight``, optional ``scaling_layer.{shift,scale}``), with
  ``--prefix`` selecting it inside a bigger checkpoint (``loss.perceptual_loss.`` in an
  LDM / VA-VAE Lightning checkpoint, ``perceptual_loss.`` in ``parity/vae_gan_losses.npz``).

Formats: ``.pth``/``.pt``/``.ckpt`` (needs the optional PyTorch install), ``.npz``,
``.safetensors`` (``sfd_jax.convert.common.load_state_dict``).

Command line::

  python -m sfd_jax.convert.lpips --vgg vgg16-397923af.pth --lin vgg.pth --dst weights/lpips_vgg
  python -m sfd_jax.convert.lpips --src last.ckpt --prefix loss.perceptual_loss. --dst DIR

The output folder (``params/`` + ``meta.json`` of kind ``lpips``) is what
``load_lpips`` and the training / evaluation configs (``loss.lpips``,
``eval_tokenizer.lpips``) read.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sfd_jax.convert.common import (ConversionError, StateDict, abstract_model, assign,
                                    load_params, load_state_dict, save_params)
from sfd_jax.models import lpips as lpips_lib

KIND = "lpips"


def _stage_of_conv() -> list[tuple[int, int]]:
  """(stage 1..5, torchvision index) of every VGG16 convolution, in order."""
  out, i = [], 0
  for stage, size in enumerate(lpips_lib.STAGE_SIZES, start=1):
    for _ in range(size):
      out.append((stage, lpips_lib.VGG16_CONV_INDICES[i]))
      i += 1
  return out


def _heads(sd: StateDict) -> dict[str, Any]:
  out = {}
  for k, c in enumerate(lpips_lib.CHANNELS):
    key = f"lin{k}.model.1.weight"
    if key not in sd and f"lins.{k}.model.1.weight" in sd:
      key = f"lins.{k}.model.1.weight"
    out[str(k)] = {"kernel": sd.get(key, (1, c, 1, 1)).transpose(2, 3, 1, 0)}
    sd.mark_used(f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight")
  return out


def _check_scaling(sd: StateDict) -> None:
  for name, want in (("shift", lpips_lib.SHIFT), ("scale", lpips_lib.SCALE)):
    key = f"scaling_layer.{name}"
    if key in sd:
      got = sd.get(key).reshape(-1)
      if got.shape != (3,) or not np.allclose(got, want, atol=1e-6):
        raise ConversionError(f"{sd.name}: {key} = {got.tolist()} differs from the LPIPS "
                              f"constant {list(want)}")


def convert_vgg_and_heads(vgg_sd: Mapping[str, Any], lin_sd: Mapping[str, Any], *,
                          vgg_name: str = "vgg16", lin_name: str = "lpips heads"
                          ) -> dict[str, Any]:
  """torchvision VGG16 ``features.*`` + lpips ``lin*`` heads → nested LPIPS params."""
  vgg = StateDict(vgg_sd, name=vgg_name, ignore_prefixes=("classifier.",))
  convs = {}
  for i, (idx, (cin, cout)) in enumerate(zip(lpips_lib.VGG16_CONV_INDICES,
                                              lpips_lib.VGG16_CONV_CHANNELS)):
    convs[str(i)] = vgg.conv(f"features.{idx}", cin, cout, 3, 3)
  vgg.check_all_used()
  lin = StateDict(lin_sd, name=lin_name)
  heads = _heads(lin)
  _check_scaling(lin)
  lin.mark_used("scaling_layer.shift", "scaling_layer.scale")
  lin.check_all_used()
  return {"convs": convs, "lins": heads}


def convert_state_dict(sd: Mapping[str, Any], name: str = "LPIPS checkpoint") -> dict[str, Any]:
  """A whole taming / lpips ``LPIPS`` state dict → nested LPIPS params."""
  s = StateDict(sd, name=name)
  convs = {}
  for i, ((stage, idx), (cin, cout)) in enumerate(zip(_stage_of_conv(),
                                                       lpips_lib.VGG16_CONV_CHANNELS)):
    convs[str(i)] = s.conv(f"net.slice{stage}.{idx}", cin, cout, 3, 3)
  heads = _heads(s)
  _check_scaling(s)
  s.mark_used("scaling_layer.shift", "scaling_layer.scale")
  s.check_all_used()
  return {"convs": convs, "lins": heads}


def build_abstract(dtype=None) -> lpips_lib.LPIPS:
  """An ``LPIPS`` with unallocated parameters, ready for ``common.assign``."""
  return abstract_model(lambda _, **kw: lpips_lib.LPIPS(**kw), None, dtype)


def model_from_params(params: Mapping[str, Any], *, dtype=None,
                      name: str = "LPIPS") -> lpips_lib.LPIPS:
  model = build_abstract(dtype)
  assign(model, params, name=name)
  return model


def random_lpips(seed: int = 0, dtype=None, width: float = 1.0) -> lpips_lib.LPIPS:
  """An LPIPS with host-drawn random weights (tests, smoke runs; no compilation).

  VGG kernels He-normal (fan-in), biases N(0, 0.01²); heads |N(0, 1)|/C, non-negative
  like the trained ones, so distances stay ≥ 0. ``width`` < 1 narrows every VGG layer
  (CPU tests). Meaningless as a perceptual metric.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = abstract_model(lambda _, **kw: lpips_lib.LPIPS(width=width, **kw), None, dtype)
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var.get_value().shape
    if str(path[0]) == "lins":
      value = np.abs(rng.normal(size=shape)) / shape[2]
    elif str(path[-1]) == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      value = 0.01 * rng.normal(size=shape)
    var.set_value(jnp.asarray(value, jnp.float32))
  return model


def save_converted(dst: str | os.PathLike, params: Mapping[str, Any], *, source: str = "",
                   force: bool = False) -> str:
  meta = {"kind": KIND, "net": "vgg", "version": "0.1", "source": source}
  return save_params(dst, params, meta=meta, force=force)


def load_lpips(path: str | os.PathLike, *, prefix: str = "", dtype=None) -> lpips_lib.LPIPS:
  """An ``LPIPS`` from a converted folder (this CLI's output) or from a whole-module state
  dict file (``--src`` layout; ``prefix`` selects it inside a bigger checkpoint)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    params, _ = load_params(path, KIND)
  else:
    params = convert_state_dict(load_state_dict(path, entries=("state_dict",), prefix=prefix),
                                name=path)
  return model_from_params(params, dtype=dtype, name=path)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m sfd_jax.convert.lpips",
      description="Convert LPIPS-VGG weights (torchvision VGG16 + lpips heads, or one "
                  "LPIPS state dict) to an sfd_jax params directory.")
  parser.add_argument("--vgg", help="torchvision VGG16 state dict (vgg16-397923af.pth)")
  parser.add_argument("--lin", help="lpips head weights (lpips/weights/v0.1/vgg.pth)")
  parser.add_argument("--src", help="a whole LPIPS state dict (instead of --vgg/--lin)")
  parser.add_argument("--prefix", default="",
                      help="key prefix of the LPIPS module inside --src "
                           "(e.g. loss.perceptual_loss.)")
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--force", action="store_true", help="overwrite a non-empty --dst")
  args = parser.parse_args(argv)
  if args.src:
    if args.vgg or args.lin:
      parser.error("give either --src or both --vgg and --lin")
    sd = load_state_dict(args.src, entries=("state_dict",), prefix=args.prefix)
    params = convert_state_dict(sd, name=args.src)
    source = os.path.abspath(args.src)
  else:
    if not (args.vgg and args.lin):
      parser.error("give both --vgg and --lin (or --src)")
    params = convert_vgg_and_heads(load_state_dict(args.vgg), load_state_dict(args.lin),
                                   vgg_name=args.vgg, lin_name=args.lin)
    source = f"{os.path.abspath(args.vgg)} + {os.path.abspath(args.lin)}"
  out = save_converted(args.dst, params, source=source, force=args.force)
  print(f"wrote {out}")
  return out


__all__ = ("KIND", "convert_vgg_and_heads", "convert_state_dict", "load_lpips", "random_lpips",
           "save_converted", "model_from_params", "main")

if __name__ == "__main__":
  main()
