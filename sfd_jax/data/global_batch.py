"""Host batches → global ``jax.Array``s: the one place where this happens.

Each process holds its slice of the global batch (``pipeline.build_pipeline`` hands
process ``p`` the examples of every global batch that are ``≡ p`` mod the process
count). ``jax.make_array_from_process_local_data`` assembles those slices into one
array sharded over the mesh; ``jnp.asarray(host_batch)`` would instead treat each
host's slice as the whole batch.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np


def _batch_pieces(mesh: Mesh, spec: PartitionSpec) -> tuple[int, int]:
  """(pieces the batch dim is split into, how many of them live on this process)."""
  if len(spec) == 0 or spec[0] is None:
    return 1, 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  dims = [mesh.axis_names.index(a) for a in axes]
  total = int(np.prod([mesh.devices.shape[d] for d in dims]))
  me = jax.process_index()
  local = {tuple(idx[d] for d in dims)
           for idx, dev in np.ndenumerate(mesh.devices) if dev.process_index == me}
  return total, len(local)


def to_global(batch: Any, mesh: Mesh, partition_spec: PartitionSpec | Any) -> Any:
  """Turns a pytree of per-process numpy arrays into global sharded arrays.

  Args:
    batch: pytree of host arrays whose leading dimension is this process's part of
      the global batch.
    mesh: the device mesh.
    partition_spec: a ``PartitionSpec`` used for every leaf (typically
      ``P(("data", "fsdp"))``: batch over the data axes, the rest replicated), or a
      pytree of specs with the structure of ``batch``.

  Returns:
    The same pytree of ``jax.Array``s with global batch = local batch × (number of
    processes the batch axes span).

  Raises:
    ValueError: naming the leaf when the spec has more dims than the array, or when
      the local batch does not divide into the batch shards this process holds.
  """
  if isinstance(partition_spec, PartitionSpec):
    specs = jax.tree.map(lambda _: partition_spec, batch)
  else:
    specs = partition_spec
  leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
  spec_leaves = treedef.flatten_up_to(specs)
  out = []
  for (path, leaf), spec in zip(leaves, spec_leaves):
    name = jax.tree_util.keystr(path) or "<batch>"
    leaf = np.asarray(leaf)
    if len(spec) > leaf.ndim:
      raise ValueError(f"batch leaf {name} of shape {leaf.shape} has fewer dims than "
                       f"its partition spec {spec}")
    sharding = NamedSharding(mesh, spec)
    pieces, local_pieces = _batch_pieces(mesh, spec) if leaf.ndim else (1, 1)
    if leaf.ndim and leaf.shape[0] % local_pieces:
      raise ValueError(
          f"batch leaf {name}: local batch {leaf.shape[0]} does not divide into the "
          f"{local_pieces} of {pieces} batch shards (mesh axes {spec[0]}, mesh "
          f"{dict(mesh.shape)}) held by this process")
    out.append(jax.make_array_from_process_local_data(sharding, leaf))
  return jax.tree_util.tree_unflatten(treedef, out)
