"""Validation loss of the SFD trainer on a held-out latent set (``config.validation``).

Every ``every_steps`` steps (and at the last step) the SFD loss is computed on the
first ``num_examples`` records of ``path`` (a latent dataset in the training format,
normalised with the *training* statistics, no flip) at each fixed training time ``t`` of
``times`` (t ∈ [0, 1], t = 0 noise; the clocks are ``τ = t·(1 + Δt)`` as in training),
with fixed noise (example i draws from ``fold_in(key(seed), i)``) and no label dropout —
so successive evaluations differ only by the weights (``weights``: ``params``, as the
reference's validation, or ``ema``). Logged to TensorBoard as ``val/loss`` (mean over
the times), ``val/loss_t<t>`` and ``val/mse_t<t>``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.core.errors import ConfigError
from sfd_jax.data import records as records_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.diffusion import clocks as clocks_lib
from sfd_jax.diffusion import objective as obj_lib


class ValidationError(ConfigError):
  """config.validation cannot be used as given."""


def enabled(config) -> bool:
  v = config.get("validation", {})
  return int(v.get("every_steps", 0) or 0) > 0


def due(config, step: int, total: int) -> bool:
  every = int(config.validation.every_steps)
  return every > 0 and (step % every == 0 or step == total)


def load_examples(config, *, repa: bool) -> dict[str, np.ndarray]:
  """The held-out examples as host arrays {"latent", "label"[, "repa"]}."""
  v, d = config.validation, config.data
  if not v.get("path", ""):
    raise ValidationError("config.validation.every_steps > 0 needs config.validation.path "
                          "(a held-out latent dataset in the training format)")
  records = records_lib.LatentRecords(v.path)
  normalize = bool(d.get("normalize", True))
  stats = None
  if normalize:
    stats = stats_lib.load_stats(d.get("stats", "") or d.path, records.schema)
  from sfd_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (Grain)
  transform = pipeline.ExampleTransform(
      records.schema, stats, latent_multiplier=float(d.get("latent_multiplier", 1.0)),
      flip=False, repa=repa and records.schema.has_repa, normalize=normalize)
  n = len(records) if int(v.get("num_examples", 0)) <= 0 else min(int(v.num_examples),
                                                                  len(records))
  rows = [transform.map_with_index(i, records[i]) for i in range(n)]
  return {k: np.stack([r[k] for r in rows]).astype(
      np.float32 if k != "label" else np.int32) for k in rows[0]}


class ValidationLoss:
  """``fn(step, state, writer) -> metrics`` for a ``loop.PeriodicHook``."""

  def __init__(self, config, setup):
    v = config.validation
    self.setup = setup
    self.weights = str(v.get("weights", "params"))
    if self.weights not in ("params", "ema"):
      raise ValidationError(f"config.validation.weights={self.weights!r}: expected 'params' "
                            "or 'ema'")
    self.times = tuple(float(t) for t in v.get("times", (0.1, 0.3, 0.5, 0.7, 0.9)))
    if not self.times or not all(0.0 <= t <= 1.0 for t in self.times):
      raise ValidationError(f"config.validation.times={self.times}: values in [0, 1]")
    cfg = setup.obj_cfg
    self.repa = bool(cfg.repa_active and setup.model_cfg.use_repa)
    self.data = load_examples(config, repa=self.repa)
    if "repa" not in self.data:
      self.repa = False
    self.n = len(self.data["label"])
    batch_devices = parallel.batch_devices(setup.mesh)
    self.bs = int(v.get("batch_size", 64))
    if self.bs < 1 or self.bs % batch_devices:
      raise ValidationError(f"config.validation.batch_size={self.bs} must be a positive "
                            f"multiple of the {batch_devices} devices of the batch axes")
    self.seed = int(v.get("seed", 0))
    self._fn = self._build()

  def _build(self):
    setup, cfg, repa, seed = self.setup, self.setup.obj_cfg, self.repa, self.seed
    act = NamedSharding(setup.mesh, P(parallel.BATCH_AXES))
    batch_sh = parallel.batch_sharding(setup.mesh)
    rep = NamedSharding(setup.mesh, P())
    shape = self.data["latent"].shape[1:]

    def losses(params, batch, t):
      model = setup.model(params)
      idx = batch["index"]
      x0 = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(
          jax.random.key(seed), i), (int(np.prod(shape)),)).reshape(shape))(idx)

      def apply_fn(xt, t_tex, t_sem, y, _drop_key):
        out = model(xt, t_tex, t_sem, y, return_repa=repa, activation_sharding=act)
        return out if repa else (out, None)

      clock_params = (clocks_lib.params_from_model(model, cfg.schedule)
                      if cfg.schedule is not None else None)
      _, m = obj_lib.training_losses(
          apply_fn, batch["latent"], batch["label"], jax.random.key(0), cfg,
          repa_target=batch.get("repa"), x0=x0,
          t=jnp.full((idx.shape[0],), t, jnp.float32), clock_params=clock_params)
      per = m["per_example"]
      total = per["mse"]
      if cfg.use_cosine_loss:
        total = total + per["cos"]
      if "repa" in per:
        total = total + per["repa"]
      w = batch["mask"]
      return {"loss": jnp.sum(total * w), "mse": jnp.sum(per["mse"] * w)}

    key = "ema" if self.weights == "ema" else setup.main.part.params_key
    return setup.jit(losses, in_shardings=(setup.state_shardings[key], batch_sh, rep),
                     out_shardings=rep), key

  def __call__(self, step: int, state, writer) -> dict[str, float]:
    fn, key = self._fn
    sums = {t: {"loss": 0.0, "mse": 0.0} for t in self.times}
    sh = parallel.batch_sharding(self.setup.mesh)
    with jax.set_mesh(self.setup.mesh):
      for start in range(0, self.n, self.bs):
        idx = np.arange(start, start + self.bs)
        take = np.minimum(idx, self.n - 1)
        batch = {k: v[take] for k, v in self.data.items()}
        batch["index"] = idx.astype(np.int32)
        batch["mask"] = (idx < self.n).astype(np.float32)
        batch = jax.device_put(batch, sh)
        for t in self.times:
          out = jax.device_get(fn(state[key], batch, jnp.float32(t)))
          for k in sums[t]:
            sums[t][k] += float(out[k])
    metrics: dict[str, float] = {}
    for t in self.times:
      metrics[f"val/loss_t{t:.2f}"] = sums[t]["loss"] / self.n
      metrics[f"val/mse_t{t:.2f}"] = sums[t]["mse"] / self.n
    metrics["val/loss"] = float(np.mean([metrics[f"val/loss_t{t:.2f}"] for t in self.times]))
    writer.write_scalars(step, metrics)
    logging.info("validation at step %d: loss %.5f", step, metrics["val/loss"])
    return metrics

