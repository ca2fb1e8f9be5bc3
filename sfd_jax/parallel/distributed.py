"""Multi-process start-up: initialise ``jax.distributed`` when launched as several processes.

Detected launches (any of):
* ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) — explicit;
* SLURM with more than one task (``SLURM_NTASKS`` > 1) — JAX reads the SLURM variables;
* a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` lists several hosts) — JAX finds peers.
Single-process runs (including one GPU host with 8 GPUs) skip initialisation.
"""
from __future__ import annotations

import os

from absl import logging


def launch_kind(env=None) -> str | None:
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return "tpu_pod"
  return None


def maybe_initialize() -> str | None:
  """Calls ``jax.distributed.initialize`` for multi-process launches; returns the kind."""
  import jax  # pylint: disable=import-outside-toplevel
  kind = launch_kind()
  if kind is None:
    return None
  if kind == "explicit":
    kw = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
      kw["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    jax.distributed.initialize(**kw)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed initialised (%s): process %d of %d", kind,
               jax.process_index(), jax.process_count())
  return kind
