"""Multi-process helpers: barriers and host gathers (no-ops on one process)."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax.core.errors import ConfigError
from sfd_jax.parallel.sharding import make_mesh


def process_barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name``."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def process0_flag(value: bool) -> bool:
  """Process 0's ``value`` on every process (itself on one process)."""
  if jax.process_count() == 1:
    return bool(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def gather(arr: jax.Array) -> np.ndarray:
  """A batch-sharded array as one host array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
  return np.asarray(jax.device_get(arr))


def local_mesh() -> Mesh:
  """A mesh over this process's devices (all on the batch axis).

  The data jobs are embarrassingly parallel: each process works on its own shards,
  so its computations never involve another process's devices.
  """
  return make_mesh({"data": -1}, devices=jax.local_devices())


def place_networks(modules: Sequence[nnx.Module], mesh: Mesh) -> tuple[tuple, tuple]:
  """(graphdefs, states replicated over ``mesh``) of frozen networks."""
  graphdefs, states = [], []
  rep = NamedSharding(mesh, P())
  for m in modules:
    gd, st = nnx.split(m)
    graphdefs.append(gd)
    states.append(jax.device_put(st, rep))
  return tuple(graphdefs), tuple(states)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  if batch_size <= 0 or batch_size % mesh.size:
    raise ConfigError(f"{field}: batch {batch_size} must be a positive multiple of the "
                      f"{mesh.size} local devices")
