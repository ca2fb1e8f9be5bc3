"""sfd_jax: Semantic-First Diffusion (SFD) in JAX / Flax NNX."""
import flax as _flax

# Parameters carry *logical* axis names as metadata; the trainer maps them to mesh
# axes with the config's rule table and shards through jit out_shardings. Flax's
# eager per-variable sharding (which needs a mesh at construction) is switched off.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
