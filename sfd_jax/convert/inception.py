"""FID Inception-v3 weights (torchvision ``Inception3`` names) -> ``sfd_jax.models.inception``.

Source layout (the FID weights file ``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid,
or any state dict with the same names, e.g. the parity fixture's ``.npz``):

* ``<unit>.conv.weight`` (out, in, kh, kw), no conv bias;
* ``<unit>.bn.{weight, bias, running_mean, running_var}`` (BatchNorm, eps 1e-3);
* optionally ``fc.weight`` (1008, 2048) and ``fc.bias`` (1008,). ``fc.weight`` becomes the
  classifier used for the Inception Score; ``fc.bias`` is read and deliberately dropped, as
  the ADM evaluator's Inception Score uses the logits before the bias add;
* ``*.num_batches_tracked`` entries are ignored.

``<unit>`` runs over every ``BasicConv2d`` of the network (``Conv2d_1a_3x3``,
``Mixed_5b.branch1x1``, ...): the JAX module uses the same attribute names, so the unit list
is read from the model itself. Arrays of any float dtype (the fixture stores float16) are cast
to float32.

CLI::

  python -m sfd_jax.convert.inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR

writes ``DIR/params`` (Orbax) and ``DIR/meta.json``; a ``.pth`` is read without PyTorch
(``core.safe_pickle``), as is an ``.npz`` / ``.safetensors`` copy of the state dict.
``load_inception`` reads either a converted directory or a state-dict file.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from sfd_jax.core import runner
from sfd_jax.convert.common import (ConversionError, StateDict, assign, load_params,
                                    load_state_dict, save_params)
from sfd_jax.models import inception as inc

MODEL_KIND = "inception_v3_fid"
FORMAT_VERSION = 1


def _num_classes_of(sd: Mapping[str, Any], name: str) -> int | None:
  if "fc.weight" not in sd:
    return None
  shape = tuple(np.shape(sd["fc.weight"]))
  if len(shape) != 2 or shape[1] != 2048:
    raise ConversionError(f"{name}: key 'fc.weight' has shape {shape}, expected "
                          "(num_classes, 2048)")
  return shape[0]


def convert_state_dict(sd: Mapping[str, Any], name: str = "inception") -> dict:
  """Torch-named FID Inception state dict -> nested dict of the JAX module's variables.

  The result holds ``kernel`` (HWIO) per conv, ``scale``/``bias``/``mean``/``var`` per
  BatchNorm and, when ``fc.weight`` is present, ``fc.kernel`` (2048, num_classes). Raises
  ConversionError naming the key (and both shapes) for a missing, misshapen or unexpected
  entry.
  """
  sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
  num_classes = _num_classes_of(sd, name)
  src = StateDict(sd, name=name)
  out: dict[str, Any] = {}
  for path, in_ch, out_ch, (kh, kw) in inc.conv_unit_specs():
    conv = src.conv(f"{path}.conv", in_ch, out_ch, kh, kw, bias=False)
    bn = src.norm(f"{path}.bn", out_ch)
    bn["mean"] = src.get(f"{path}.bn.running_mean", (out_ch,))
    bn["var"] = src.get(f"{path}.bn.running_var", (out_ch,))
    node = out
    for part in path.split("."):
      node = node.setdefault(part, {})
    node["conv"] = conv
    node["bn"] = bn
  if num_classes is not None:
    out["fc"] = src.linear("fc", 2048, num_classes, bias=False)
    if "fc.bias" in src:
      src.get("fc.bias", (num_classes,))  # shape-checked, intentionally unused (see doc)
  src.check_all_used()
  return out


def build_inception(tree: Mapping[str, Any], *, name: str = "inception",
                    **model_kwargs: Any) -> inc.InceptionV3:
  """An ``InceptionV3`` holding the converted ``tree`` (no random initialisation).

  ``model_kwargs`` go to the constructor (``preprocess``, ``dtype``, ...); ``num_classes``
  is taken from the tree.
  """
  num_classes = int(np.shape(tree["fc"]["kernel"])[1]) if "fc" in tree else None
  model = inc.abstract_inception(num_classes=num_classes, **model_kwargs)
  assign(model, tree, name=name, variables=(nnx.Param, nnx.BatchStat))
  return model


def load_inception(path: str | os.PathLike, **model_kwargs: Any) -> inc.InceptionV3:
  """Loads the FID Inception from a converted directory or a state-dict file.

  Args:
    path: a directory written by this module's CLI / ``save_params``, or a state dict
      (``.npz``, ``.safetensors`` or ``.pth``).
    **model_kwargs: ``preprocess`` (``"pytorch_fid"`` | ``"adm"``), ``dtype``,
      ``param_dtype``, ``precision``.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    tree, meta = load_params(path, MODEL_KIND, strict=False)
  else:
    tree = convert_state_dict(load_state_dict(path), name=path)
  return build_inception(tree, name=path, **model_kwargs)


def main(argv: list[str] | None = None) -> None:
  parser = runner.ArgumentParser(
      prog="python -m sfd_jax.convert.inception",
      description="Convert pytorch-fid's FID Inception-v3 weights to an sfd_jax checkpoint.")
  parser.add_argument(
      "--src", required=True,
      help="pt_inception-2015-12-05-6726825d.pth or an .npz/.safetensors copy")
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--force", action="store_true", help="overwrite a non-empty --dst")
  args = parser.parse_args(argv)
  tree = convert_state_dict(load_state_dict(args.src), name=args.src)
  num_classes = int(tree["fc"]["kernel"].shape[1]) if "fc" in tree else None
  meta = {"model": MODEL_KIND, "format_version": FORMAT_VERSION,
          "source": os.path.abspath(args.src), "num_classes": num_classes,
          "fc_bias": "dropped (ADM Inception Score uses pool3 @ fc.weight.T)"}
  out = save_params(args.dst, tree, meta=meta, force=args.force)
  print(f"wrote {out} (num_classes={num_classes})")


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.convert.inception")
