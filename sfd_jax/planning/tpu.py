"""TPU topologies for ahead-of-time compilation on a machine without TPUs.

With ``libtpu`` installed (the TPU compiler: the version jax pins in its ``tpu`` extra,
e.g. ``pip install "libtpu==0.0.42.*"`` for jax 0.10.2; ``bash .ci/run tpu-compiler``),
``jax.experimental.topologies.get_topology_desc`` describes a TPU slice by name and
returns *compile-only* devices: ``jit(...).lower(...).compile()`` on a mesh of them runs
the real TPU compiler, and ``memory_analysis()`` / the optimized HLO describe one chip.
Nothing is allocated and no TPU is needed.

Names: ``<generation>:<chips per dimension>``, e.g. ``v5p:2x2x2`` (8 chips), ``v5e:4x4``
(16), ``v6e:2x4``, ``v4:2x2x2``; ``num_slices`` > 1 adds slices (multi-slice over DCN).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import re

from sfd_jax.core.errors import ConfigError


class PlanError(ConfigError):
  """A plan that cannot be made: the TPU compiler missing, a topology or mesh that does
  not work, a program that does not fit the chip."""
  kind = "plan error"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what ``device_kind`` it reports and its nominal HBM."""
  generation: str
  name: str                  # marketing name
  device_kind: str           # jax's Device.device_kind
  hbm_gib: float             # HBM per chip (nominal; the runtime keeps a little)
  dims: int                  # topology dimensions (2-D torus or 3-D)
  peak_bf16_tflops: float    # dense bf16 peak per chip
  chip_config: str = "default"  # compile-only device granularity (megacore: one per chip)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", "TPU v4", 32.0, 3, 275.0, "megacore"),
    "v5e": Chip("v5e", "TPU v5e", "TPU v5 lite", 16.0, 2, 197.0),
    "v5p": Chip("v5p", "TPU v5p", "TPU v5", 95.0, 3, 459.0, "megacore"),
    "v6e": Chip("v6e", "TPU v6e (Trillium)", "TPU v6 lite", 32.0, 2, 918.0),
}
HOST_BOUNDS = (2, 2, 1)      # chips per host (the default TPU VM: 4 chips)
SKIP_METADATA_ENV = "TPU_SKIP_MDS_QUERY"   # no GCE metadata-server lookup off Cloud TPU
# libtpu takes a machine-wide lock file (libtpu_lockfile in the temporary directory) for
# the TPU chips it drives; compiling for compile-only devices drives none, so several
# processes may compile at once
SHARED_ENV = "ALLOW_MULTIPLE_LIBTPU_LOAD"


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                  # as given, e.g. "v5p:2x2x2"
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def label(self) -> str:
    return self.name if self.num_slices == 1 else f"{self.name} x{self.num_slices} slices"


def parse_topology(name: str, num_slices: int = 1,
                   field: str = "config.plan.topology") -> Topology:
  """``"v5p:2x2x2"`` → Topology; ``PlanError`` naming ``field`` otherwise."""
  known = ", ".join(f"{g} ({c.dims}-D, e.g. {g}:{'x'.join(['2'] * c.dims)})"
                    for g, c in CHIPS.items())
  m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:x\d+)*)\s*", str(name))
  if not m:
    raise PlanError(f"{field}={name!r}: expected GENERATION:AxB[xC], one of {known}")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if gen not in CHIPS:
    raise PlanError(f"{field}={name!r}: unknown TPU generation {gen!r}; known: {known}")
  chip = CHIPS[gen]
  if len(dims) != chip.dims or min(dims) < 1:
    raise PlanError(f"{field}={name!r}: {chip.name} slices have {chip.dims} dimensions "
                    f"of at least 1 chip, e.g. {gen}:{'x'.join(['2'] * chip.dims)}")
  if not isinstance(num_slices, int) or isinstance(num_slices, bool) or num_slices < 1:
    raise PlanError(f"config.plan.num_slices must be an integer >= 1, got {num_slices!r}")
  return Topology(f"{gen}:{'x'.join(map(str, dims))}", chip, dims, num_slices)


def libtpu_requirement() -> str:
  """The libtpu pin of the installed jax's ``tpu`` extra (e.g. ``libtpu==0.0.42.*``)."""
  try:
    for req in importlib.metadata.requires("jax") or ():
      if req.startswith("libtpu") and 'extra == "tpu"' in req.replace("'", '"'):
        return req.split(";")[0].strip().replace(" ", "")
  except importlib.metadata.PackageNotFoundError:
    pass
  return "libtpu"


def libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def require_libtpu() -> None:
  """``PlanError`` with the install line when the TPU compiler is not installed."""
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError(
        f"the TPU compiler (libtpu) is not installed: pip install \"{libtpu_requirement()}\" "
        "(the version this jax pins, about 680 MB). "
        "--mode=plan compiles for TPUs on any machine once it is installed")


@functools.lru_cache(maxsize=16)
def _devices(name: str, shape: tuple[int, ...], chip_config: str, num_slices: int):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  full = tuple(shape) + (1,) * (3 - len(shape))
  bounds = tuple(min(d, b) for d, b in zip(full, HOST_BOUNDS))
  return tuple(topologies.get_topology_desc(
      platform="tpu", topology_name=name, chip_config_name=chip_config,
      chips_per_host_bounds=bounds, num_slices=num_slices,
      wrap=(False, False, False)).devices)


def devices(topology: Topology) -> list:
  """Compile-only devices of ``topology`` (one per chip), in the topology's order."""
  require_libtpu()
  os.environ.setdefault(SKIP_METADATA_ENV, "1")
  os.environ.setdefault(SHARED_ENV, "1")
  try:
    devs = _devices(topology.name, topology.shape, topology.chip.chip_config,
                    topology.num_slices)
  except Exception as e:  # pylint: disable=broad-except
    text = " ".join(str(e).split())
    raise PlanError(f"config.plan.topology={topology.name!r} (num_slices="
                    f"{topology.num_slices}): the TPU compiler does not accept it ({text})"
                    ) from e
  if len(devs) != topology.chips:
    raise PlanError(f"config.plan.topology={topology.name!r}: the TPU compiler describes "
                    f"{len(devs)} devices, expected {topology.chips} chips")
  kind = devs[0].device_kind
  if kind != topology.chip.device_kind:
    raise PlanError(f"config.plan.topology={topology.name!r}: the TPU compiler describes "
                    f"{kind!r} devices, expected {topology.chip.device_kind!r}")
  return list(devs)
