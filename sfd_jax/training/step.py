"""The one update-step builder: loss functions in, a donated, jitted ``step`` out.

``make_train_step(setup, losses)`` returns ``step(state, batch) -> (state, metrics)``:
a pure function of the state and the global batch, with explicit in/out shardings and
the state donated. For each trainable part, in the order of ``setup.parts`` (a GAN:
generator, then discriminator, on the same batch as the reference alternates them):

1. ``key = fold_in(key(seed), step)`` — the randomness of the whole *global* batch, so
   every example on every device draws its own noise and a resumed run replays exactly;
2. ``(loss, metrics), grads = value_and_grad(loss_fn)(params)`` where
   ``loss_fn(model, batch, key, state)`` gets the part's module merged from the params
   (``state`` holds the other parts, already updated earlier in this step);
3. optimizer update, optional EMA (``setup.ema_decay``), global norms (grad, param,
   update) and the learning rate as metrics; a NaN/Inf loss or gradient norm increments
   ``state["nonfinite"]``.

With more than one part, metric names are prefixed with the part's params key.

Options (``config.optimizer`` in the SFD trainer):

* ``accumulate_steps=k`` (gradient accumulation): the global batch is split into k
  micro-batches (micro-batch j = rows j, j+k, ...: a local reshape of each device's
  rows, no communication), whose gradients are computed one after the other in a
  ``lax.scan`` and averaged: the same update as one step on the whole batch, within
  float32 rounding, with the activation memory of one micro-batch. A part's
  ``presample(batch, key)`` draws the randomness of the whole batch first (noise, times,
  label dropout — exactly what the unaccumulated loss draws from ``key``) and puts it
  into the batch, so every micro-batch sees the values it would have seen.
* ``skip_nonfinite``: a step whose loss or gradient norm is NaN/Inf leaves the part's
  params, optimizer state and EMA unchanged (``skipped`` = 1 in the metrics) instead of
  counting in ``state["nonfinite"]`` (which stops the run before the next save);
  ``skip_grad_norm_above > 0`` also skips steps whose gradient norm exceeds it (loss
  spikes). The step counter and the data position advance either way.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.training.state import TrainSetup

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Mapping[str, Any]],
                  tuple[jax.Array, dict[str, jax.Array]]]


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves, accumulated in float32."""
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def microbatches(batch, k: int, mesh) -> Any:
  """[B, ...] leaves → [k, B/k, ...] with micro-batch j = rows j::k, batch-sharded."""
  sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def accumulated_value_and_grad(fn, params, batch, k: int, mesh, grad_sharding=None):
  """``((loss, metrics), grads)`` of ``fn(params, micro_batch)`` averaged over the k
  micro-batches of ``batch`` (one ``lax.scan``; gradients summed in float32)."""
  micro = microbatches(batch, k, mesh)
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  first = jax.tree.map(lambda x: x[0], micro)
  out_shape = jax.eval_shape(grad_fn, params, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shape)

  def body(acc, mb):
    out = grad_fn(params, mb)
    acc = jax.tree.map(lambda a, o: a + o.astype(jnp.float32), acc, out)
    if grad_sharding is not None:
      acc = (acc[0], jax.lax.with_sharding_constraint(acc[1], grad_sharding))
    return acc, None

  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, out_shape)


def make_train_step(setup: TrainSetup, losses: LossFn | Mapping[str, LossFn], *,
                    donate: bool = True, accumulate_steps: int = 1,
                    presample: Mapping[str, Callable] | None = None,
                    skip_nonfinite: bool = False,
                    skip_grad_norm_above: float = 0.0,
                    global_batch_size: int | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)`` for the parts of ``setup``.

  ``losses``: one loss function (for a single-part setup) or ``{params_key: loss_fn}``.
  ``accumulate_steps``, ``presample`` (``{params_key: fn(batch, key) -> batch}``),
  ``skip_nonfinite``, ``skip_grad_norm_above``: see the module docstring;
  ``global_batch_size`` lets the accumulation settings be checked up front.
  """
  if callable(losses):
    losses = {setup.main.part.params_key: losses}
  unknown = set(losses) - {ps.part.params_key for ps in setup.parts}
  if unknown:
    raise ValueError(f"loss functions for unknown parts {sorted(unknown)}")
  k = int(accumulate_steps)
  if k < 1:
    raise ValueError(f"config.optimizer.accumulate_steps={k} must be >= 1")
  batch_devices = int(np.prod([setup.mesh.shape[a] for a in parallel.BATCH_AXES]))
  if k > 1 and global_batch_size is not None and global_batch_size % (k * batch_devices):
    raise ValueError(
        f"config.optimizer.accumulate_steps={k}: the global batch {global_batch_size} must "
        f"split into {k} micro-batches that divide over the {batch_devices} devices of "
        f"the batch axes (batch_size a multiple of {k * batch_devices})")
  presample = dict(presample or {})
  base_key = jax.random.key(setup.seed)
  decay = setup.ema_decay
  prefix = len(setup.parts) > 1

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    state = dict(state)
    all_metrics: dict[str, jax.Array] = {}
    finite = jnp.bool_(True)
    for i, ps in enumerate(setup.parts):
      p = ps.part
      if p.params_key not in losses:
        continue
      loss_fn = losses[p.params_key]
      part_key = key if i == 0 else jax.random.fold_in(key, i)
      if k > 1:
        part_batch = batch
        if p.params_key in presample:
          part_batch = presample[p.params_key](batch, part_key)
        (loss, metrics), grads = accumulated_value_and_grad(
            lambda params, mb: loss_fn(ps.model(params), mb, part_key, state),
            state[p.params_key], part_batch, k, setup.mesh,
            setup.state_shardings[p.params_key])
      else:
        grad_fn = jax.value_and_grad(
            lambda params: loss_fn(ps.model(params), batch, part_key, state), has_aux=True)
        (loss, metrics), grads = grad_fn(state[p.params_key])
      metrics = dict(metrics)
      updates, opt_state = p.tx.update(grads, state[p.opt_key], state[p.params_key])
      params = optax.apply_updates(state[p.params_key], updates)
      grad_norm = global_norm(grads)
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      if skip_nonfinite or skip_grad_norm_above > 0:
        keep = ok if skip_nonfinite else jnp.bool_(True)
        if skip_grad_norm_above > 0:
          keep = keep & ~(grad_norm > skip_grad_norm_above)
        old = (state[p.params_key], state[p.opt_key])
        params, opt_state = jax.tree.map(lambda n, o: jnp.where(keep, n, o),
                                         (params, opt_state), old)
        metrics["skipped"] = (~keep).astype(jnp.float32)
        if skip_nonfinite:
          ok = jnp.bool_(True)            # a skipped step leaves the state good
      if p.ema_key:
        ema = jax.tree.map(lambda e, q: (decay * e + (1.0 - decay) * q).astype(e.dtype),
                           state[p.ema_key], params)
        if "skipped" in metrics:
          ema = jax.tree.map(lambda n, o: jnp.where(metrics["skipped"] > 0, o, n), ema,
                             state[p.ema_key])
        state[p.ema_key] = ema
      finite = finite & ok
      metrics.update(grad_norm=grad_norm, param_norm=global_norm(params),
                     update_norm=global_norm(updates))
      if p.schedule is not None:
        metrics["lr"] = jnp.asarray(p.schedule(state["step"]), jnp.float32)
      state[p.params_key], state[p.opt_key] = params, opt_state
      all_metrics.update({(f"{p.params_key}/{k}" if prefix else k): v
                          for k, v in metrics.items()})
    state["step"] = state["step"] + 1
    state["nonfinite"] = state["nonfinite"] + (~finite).astype(jnp.int32)
    return state, all_metrics

  rep = NamedSharding(setup.mesh, P())
  batch_sh = parallel.batch_sharding(setup.mesh)
  return setup.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, rep),
                   donate_argnums=(0,) if donate else ())
