"""Device mesh and logical-axis sharding.

Weights carry *logical* axis names (``sfd_jax.models.layers``); a config's rule table
maps each logical name to a mesh axis (or ``None`` = replicated). This module is the only
place where the two meet:

* ``make_mesh(mesh_cfg)`` builds a ``Mesh`` with axes ``(data, fsdp, tensor)`` (one size
  may be -1: "all remaining devices").
* ``logical_to_mesh(spec, rules, mesh)`` turns a logical ``PartitionSpec`` into a mesh one.
  A mesh axis is used at most once per array (later dims that would reuse it are
  replicated), and a dimension that does not divide its mesh axes is replicated with a
  note — except when ``strict``, where it is an error naming the weight.
* ``state_shardings`` / ``sharding_table`` do this for a whole state tree.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sfd_jax.core.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Default FSDP rules (DESIGN §3.4): hidden over fsdp; MLP hidden, heads, adaLN over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("adaln", "tensor"),
    ("repa", ("fsdp", "tensor")),  # REPA projector: its square middle layer needs fsdp too
    ("vocab", None),
    ("freq", None),
    ("channels", None),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


class ShardingError(ConfigError):
  """A batch or weight does not fit the mesh."""


def make_mesh(shape: Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over ``devices`` (default: all) with axes (data, fsdp, tensor).

  ``shape`` gives each axis' size (dict or 3-sequence); one entry may be -1 to take
  the remaining devices. Errors name the sizes and the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ShardingError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != 3:
      raise ShardingError(f"mesh shape needs 3 sizes (data, fsdp, tensor), got {sizes}")
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest <= 0 or n % rest:
      raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n} devices not divisible "
                          f"by the fixed axes ({rest})")
    sizes[sizes.index(-1)] = n // rest
  if math.prod(sizes) != n or min(sizes) <= 0:
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                        f"devices, but {n} are available")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    arr = mesh_utils.create_device_mesh(sizes, devices=devices,
                                        allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rules_dict(rules) -> dict[str, Any]:
  out = {}
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out[name] = target
  return out


def logical_to_mesh(logical: Sequence[str | None] | None, shape: Sequence[int], rules,
                    mesh: Mesh, *, name: str = "array", strict: bool = False,
                    notes: list[str] | None = None) -> P:
  """Maps one array's logical axis names to a mesh ``PartitionSpec``."""
  rules = _rules_dict(rules)
  if logical is None:
    return P()
  if len(logical) != len(shape):
    raise ShardingError(f"{name}: {len(logical)} logical axes {tuple(logical)} for an array "
                        f"of shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for dim, lname in zip(shape, logical):
    if lname is None:
      out.append(None)
      continue
    if lname not in rules:
      raise ShardingError(f"{name}: logical axis '{lname}' has no rule; add it to "
                          f"config.sharding_rules (known: {sorted(rules)})")
    target = rules[lname]
    axes = () if target is None else (target if isinstance(target, tuple) else (target,))
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if axes and dim % size:
      msg = (f"{name}: dimension {dim} (logical '{lname}') is not divisible by mesh axes "
             f"{axes} of total size {size}")
      if strict:
        raise ShardingError(msg)
      if notes is not None:
        notes.append(msg + " -> replicated")
      axes = ()
    used.update(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def tree_shardings(abstract: Any, logical_specs: Any, rules, mesh: Mesh,
                   strict: bool = False, notes: list[str] | None = None) -> Any:
  """NamedShardings for a tree of arrays given a same-structured tree of logical specs."""
  def one(path, leaf, spec):
    logical = tuple(spec) if spec is not None else None
    return NamedSharding(mesh, logical_to_mesh(logical, leaf.shape, rules, mesh,
                                               name=_path_str(path), strict=strict,
                                               notes=notes))
  return jax.tree_util.tree_map_with_path(
      one, abstract, logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh) -> int:
  """The devices a batch is split over (the product of the batch axes data × fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, process_count: int | None = None) -> None:
  """Readable start-up error when the global batch does not divide the batch axes."""
  size = batch_devices(mesh)
  if global_batch % size:
    raise ShardingError(f"config.batch_size={global_batch} is not divisible by the batch "
                        f"mesh axes data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']} "
                        f"= {size}; use a multiple of {size} (or change config.mesh)")
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise ShardingError(f"config.batch_size={global_batch} is not divisible by the number "
                        f"of processes ({pc}); use a multiple of {pc}")


def sharding_table(tree: Any, min_size: int = 0) -> list[tuple[str, tuple, str, int]]:
  """(path, shape, PartitionSpec, bytes per device) for every array in a sharded tree."""
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "sharding") or leaf.size < min_size:
      continue
    spec = getattr(leaf.sharding, "spec", P())
    shard = leaf.sharding.shard_shape(leaf.shape)
    rows.append((_path_str(path), tuple(leaf.shape), str(spec),
                 int(np.prod(shard)) * leaf.dtype.itemsize))
  return rows


def format_sharding_table(rows) -> str:
  lines = [f"{'parameter':60s} {'shape':>22s} {'spec':>36s} {'MiB/dev':>9s}"]
  for path, shape, spec, nbytes in rows:
    lines.append(f"{path[:60]:60s} {str(shape):>22s} {spec[:36]:>36s} "
                 f"{nbytes / 2**20:9.2f}")
  return "\n".join(lines)
