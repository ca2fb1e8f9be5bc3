"""Orbax checkpoints: the manager of a training run's composites, preemption, and
reading runs (config, weights only, whole state)."""
from sfd_jax.checkpoint.manager import ITEMS, CheckpointError, Checkpointer, PreemptionGuard
from sfd_jax.checkpoint.runs import (WEIGHTS, available_steps, checkpoint_dir, dit_config,
                                     is_run, load_dit, read_config, restore_dit,
                                     restore_state_only, restore_weights)

__all__ = ["ITEMS", "WEIGHTS", "CheckpointError", "Checkpointer", "PreemptionGuard",
           "available_steps", "checkpoint_dir", "dit_config", "is_run", "load_dit",
           "read_config", "restore_dit",
           "restore_state_only", "restore_weights"]
