"""LightningDiT's timestep embedders per clock part (docs/clocks.md)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT

TINY = dict(input_size=2, in_channels=6, semantic_chans=2, hidden_size=32, depth=2,
            num_heads=2, num_classes=10, use_repa=False)


def _names(model):
  return sorted(k for k in nnx.to_pure_dict(nnx.state(model, nnx.Param))
                if k.startswith("t_embedder") or k.startswith("clock_"))


def test_two_part_model_unchanged_and_one_part_full_width():
  m = LightningDiT(DiTConfig(**TINY, delta_t=0.3), rngs=nnx.Rngs(0))
  assert _names(m) == ["t_embedder_sem", "t_embedder_tex"]
  # an explicit two-part layout builds the same parameters with the same values
  m2 = LightningDiT(DiTConfig(**TINY, delta_t=0.3, time_parts=("texture", "semantic")),
                    rngs=nnx.Rngs(0))
  a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(m2, nnx.Param)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
  m1 = LightningDiT(DiTConfig(**TINY, delta_t=0.0), rngs=nnx.Rngs(0))
  assert _names(m1) == ["t_embedder"]


def test_three_part_model_embedders_and_learned_clock_params():
  cfg = DiTConfig(**TINY, delta_t=0.3, time_parts=("texture", "extra", "semantic"),
                  learned_clocks=(("semantic", 4),))
  m = LightningDiT(cfg, rngs=nnx.Rngs(0))
  assert _names(m) == ["clock_semantic", "t_embedder_extra", "t_embedder_semantic",
                       "t_embedder_texture"]
  assert cfg.time_embedder_widths() == (10, 10, 12)
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 6))
  t = jnp.full((3,), 0.5)
  y = jnp.arange(3)
  v = m(x, (t, t * 0.5, t * 0.2), None, y)
  assert v.shape == x.shape
  _, inter = m(x, (t, t * 0.5, t * 0.2), None, y, return_intermediates=True)
  assert inter["t_emb"].shape == (3, 32)
  # each part's time moves exactly its own slice of the embedding: [semantic | extra | texture]
  slices = {0: slice(20, 32), 1: slice(10, 20), 2: slice(0, 10)}
  base = np.asarray(inter["t_emb"])
  for i in range(3):
    ts = [t, t * 0.5, t * 0.2]
    ts[i] = ts[i] + 0.3
    emb = np.asarray(m(x, tuple(ts), None, y, return_intermediates=True)[1]["t_emb"])
    changed = np.any(emb != base, axis=0)
    want = np.zeros(32, bool)
    want[slices[i]] = True
    np.testing.assert_array_equal(changed, want)
  np.testing.assert_array_equal(np.asarray(m.clock_semantic[...]), np.zeros(4))


def test_from_config_reads_the_schedule_layout():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(variant="custom", **TINY))
  c.objective = ml_collections.ConfigDict(dict(delta_t=0.3))
  assert DiTConfig.from_config(c).num_time_embedders == 2
  c.schedule = ml_collections.ConfigDict(dict(order=("texture", "extra", "semantic"), parts=dict(
      texture=dict(channels=3, start=0.3), extra=dict(channels=1, family="rate", rate=2.0),
      semantic=dict(channels=2, family="learned", bins=4))))
  cfg = DiTConfig.from_config(c)
  assert cfg.time_parts == ("texture", "extra", "semantic")
  assert cfg.learned_clocks == (("semantic", 4),)
  c.schedule = ml_collections.ConfigDict(dict(parts=dict(
      texture=dict(channels=4), semantic=dict(channels=2, loss_weight=2.0))))
  assert DiTConfig.from_config(c).num_time_embedders == 1     # one shared clock
