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
   update; param/update only on logging steps with ``norms_every``) and the learning
   rate as metrics; a NaN/Inf loss or gradient norm increments
   ``state["nonfinite"]``.

With more than one part, metric names are prefixed with the part's params key.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.training.state import TrainSetup

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Mapping[str, Any]],
                  tuple[jax.Array, dict[str, jax.Array]]]


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves, accumulated in float32."""
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(setup: TrainSetup, losses: LossFn | Mapping[str, LossFn], *,
                    donate: bool = True, norms_every: int = 1,
                    total_steps: int | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)`` for the parts of ``setup``.

  ``losses``: one loss function (for a single-part setup) or ``{params_key: loss_fn}``.
  ``norms_every``: the parameter and update norms (two extra passes over the weights) are
  computed only on steps whose count after the update is a multiple of it, or equals
  ``total_steps`` — the steps the loop logs — and are 0 otherwise (``lax.cond``). The
  gradient norm is computed every step (the NaN guard needs it). 1: every step.
  """
  if norms_every < 1:
    raise ValueError(f"norms_every must be >= 1, got {norms_every}")
  if callable(losses):
    losses = {setup.main.part.params_key: losses}
  unknown = set(losses) - {ps.part.params_key for ps in setup.parts}
  if unknown:
    raise ValueError(f"loss functions for unknown parts {sorted(unknown)}")
  base_key = jax.random.key(setup.seed)
  decay = setup.ema_decay
  prefix = len(setup.parts) > 1

  def _norms(params, updates, step):
    def compute(pu):
      return {"param_norm": global_norm(pu[0]), "update_norm": global_norm(pu[1])}
    if norms_every == 1:
      return compute((params, updates))
    done = step + 1
    due = done % norms_every == 0
    if total_steps is not None:
      due = due | (done == total_steps)
    zeros = lambda pu: {"param_norm": jnp.float32(0), "update_norm": jnp.float32(0)}
    return jax.lax.cond(due, compute, zeros, (params, updates))

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
      grad_fn = jax.value_and_grad(
          lambda params: loss_fn(ps.model(params), batch, part_key, state), has_aux=True)
      (loss, metrics), grads = grad_fn(state[p.params_key])
      metrics = dict(metrics)
      updates, opt_state = p.tx.update(grads, state[p.opt_key], state[p.params_key])
      params = optax.apply_updates(state[p.params_key], updates)
      if p.ema_key:
        state[p.ema_key] = jax.tree.map(
            lambda e, q: (decay * e + (1.0 - decay) * q).astype(e.dtype),
            state[p.ema_key], params)
      grad_norm = global_norm(grads)
      finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      metrics.update(grad_norm=grad_norm, **_norms(params, updates, state["step"]))
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
