"""Shared test helpers."""
import numpy as np


def flat_dict(d, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def assert_close_ref(actual, ref, tol=1e-4, name=""):
  """max|a - ref| <= tol * max(1, max|ref|): the parity README's criterion."""
  actual = np.asarray(actual, np.float64)
  ref = np.asarray(ref, np.float64)
  assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != {ref.shape}"
  bound = tol * max(1.0, float(np.max(np.abs(ref))))
  err = float(np.max(np.abs(actual - ref)))
  assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def write_tiny_latents(directory, n=64, grid=4, repa_dim=16, num_classes=10, seed=0,
                       per_shard=32):
  """A small class-structured latent dataset in the trainer's format (+ stats.npz).

  Each class has its own mean pattern, so a denoiser can learn something in a few steps.
  """
  from sfd_jax.data import records, stats as stats_lib
  from sfd_jax.data.schema import LatentSchema
  schema = LatentSchema(grid=grid, texture_channels=32, semantic_channels=16,
                        repa_dim=repa_dim)
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(num_classes, grid, grid, 48)).astype(np.float32)
  rprotos = rng.normal(size=(num_classes, grid, grid, repa_dim)).astype(np.float32)
  examples = []
  for i in range(n):
    c = i % num_classes
    lat = protos[c] + 0.1 * rng.normal(size=protos[c].shape).astype(np.float32)
    rep = rprotos[c] + 0.1 * rng.normal(size=rprotos[c].shape).astype(np.float32)
    examples.append({
        "texture": lat[..., :32], "semantic": lat[..., 32:],
        "texture_flip": lat[:, ::-1, :32].copy(), "semantic_flip": lat[:, ::-1, 32:].copy(),
        "repa": rep.astype(np.float16), "repa_flip": rep[:, ::-1].astype(np.float16),
        "label": np.int64(c)})
  records.write_examples(directory, examples, schema, records_per_shard=per_shard)
  st = stats_lib.compute_stats(records.LatentRecords(directory), num_samples=n)
  st.save(stats_lib.stats_path(directory))
  return str(directory)


def tiny(data, **overrides):
  """configs/tiny.py on the dataset ``data`` with dotted-path ``overrides``
  (``tiny(d, **{"optimizer.lr": 1e-3})``)."""
  from configs import tiny as tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config.get_config(f"data={data}")
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c
