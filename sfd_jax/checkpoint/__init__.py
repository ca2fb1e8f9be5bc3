"""Orbax checkpoints: the manager of a training run's composites, preemption, reading
runs (config, weights only, whole state) and exporting them."""
from sfd_jax.checkpoint.manager import ITEMS, Checkpointer, PreemptionGuard
from sfd_jax.checkpoint.runs import (WEIGHTS, available_steps, check_texture_vae,
                                     checkpoint_dir, dit_config, is_run, load_dit,
                                     load_texture_vae, read_config, restore_dit,
                                     restore_state_only, restore_weights, what_is)

__all__ = ["ITEMS", "WEIGHTS", "Checkpointer", "PreemptionGuard", "available_steps",
           "check_texture_vae", "checkpoint_dir", "dit_config", "is_run", "load_dit",
           "load_texture_vae", "read_config", "restore_dit", "restore_state_only",
           "restore_weights", "what_is"]
