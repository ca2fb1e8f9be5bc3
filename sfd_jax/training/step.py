"""The one update-step builder: loss functions in, a donated, jitted ``step`` out.

``make_train_step(setup, losses)`` returns ``step(state, batch) -> (state, metrics)``:
a pure function of the state and the global batch, with explicit in/out shardings and
the state donated. For each trainable part, in the order of ``setup.parts`` (a GAN:
generator, then discriminator, on the same batch as the reference alternates them):

1. ``key = fold_in(key(seed), step)`` — the randomness of the whole *global* batch, so
   every example on every device draws its own noise and a resumed run replays exactly;
2. ``(loss, metrics), grads = value_and_grad(loss_fn)(params)`` where
   ``loss_fn(model, batch, key, ctx)`` gets the part's module merged from the params
   (and, for a part with a ``stats_key``, its statistics). ``ctx`` is the state as it
   stands (the parts updated earlier in this step already updated) plus ``ctx["carry"]``
   (values handed on by earlier parts of this step) and ``ctx["frozen"]`` (the frozen
   networks as modules, when the step has any);
3. optimizer update, optional EMA (``setup.ema_decay``), global norms (grad, param,
   update; param/update only on logging steps with ``norms_every``) and the learning
   rate as metrics; a NaN/Inf loss or gradient norm increments
   ``state["nonfinite"]``.

A loss function returns ``(loss, metrics)`` or ``(loss, metrics, out)`` with ``out`` a
mapping of optional entries:

* ``"state"``: ``{stats_key: new statistics}`` for non-trainable entries of *other*
  parts (the generator's call of the discriminator in training mode updates the
  discriminator's BatchNorm statistics, as in the reference);
* ``"carry"``: ``{name: value}`` handed to the loss functions of later parts of the same
  step (the generator's reconstructions for the discriminator), never stored.

A part's own statistics are read back from its module after the loss function ran (a
BatchNorm in training mode updates them in place), unless ``out["state"]`` sets them.

A loss function wrapped in ``OwnGradients`` computes its own gradients and returns them
as ``out["grads"]`` (same structure as the part's params); the step then calls it once
without differentiating it. The GAN generator does: its adaptive weights already
need the loss terms' pullbacks, and the total gradient is one more pullback of the same
forward pass.

With more than one part, metric names are prefixed with the part's ``metrics_prefix``
(default: its params key).

Options (``config.optimizer`` in the SFD trainer):

* ``accumulate_steps=k`` (gradient accumulation): the global batch is split into k
  micro-batches (micro-batch j = rows j, j+k, ...: a local reshape of each device's
  rows, no communication), whose gradients are computed one after the other in a
  ``lax.scan`` and averaged: the same update as one step on the whole batch, within
  float32 rounding, with the activation memory of one micro-batch. A part's
  ``presample(batch, key)`` draws the randomness of the whole batch first (noise, times,
  label dropout — exactly what the unaccumulated loss draws from ``key``) and puts it
  into the batch, so every micro-batch sees the values it would have seen. Parts that
  compute their own gradients, keep statistics or hand on state/carry are not
  accumulated (an error says so).
* ``skip_nonfinite``: a step whose loss or gradient norm is NaN/Inf leaves the part's
  params, optimizer state and EMA unchanged (``skipped`` = 1 in the metrics) instead of
  counting in ``state["nonfinite"]`` (which stops the run before the next save);
  ``skip_grad_norm_above > 0`` also skips steps whose gradient norm exceeds it (loss
  spikes). The step counter and the data position advance either way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.core.errors import ConfigError
from sfd_jax.training.state import FrozenNet, TrainSetup

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Mapping[str, Any]],
                  tuple]
RESERVED = ("carry", "frozen")


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves, accumulated in float32."""
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


@dataclasses.dataclass(frozen=True)
class OwnGradients:
  """A loss function that returns its gradients as ``out["grads"]`` (also a decorator)."""
  fn: LossFn

  def __call__(self, model, batch, key, ctx):
    return self.fn(model, batch, key, ctx)


@dataclasses.dataclass(frozen=True, eq=False)
class BoundStep:
  """A jitted step with the frozen networks' weights bound as its last argument: called
  and lowered with ``(state, batch)`` like a jitted step without frozen networks."""
  jitted: Any
  weights: Mapping[str, Any]

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.weights)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.weights)


def _split_result(result, name: str, with_grads: bool = False):
  if not isinstance(result, tuple) or len(result) not in (2, 3):
    raise TypeError(f"loss function of part {name!r} must return (loss, metrics) or "
                    "(loss, metrics, out)")
  loss, metrics = result[0], result[1]
  out = dict(result[2]) if len(result) == 3 and result[2] is not None else {}
  allowed = {"state", "carry"} | ({"grads"} if with_grads else set())
  unknown = set(out) - allowed
  if unknown:
    raise ValueError(f"loss function of part {name!r}: unknown output entries "
                     f"{sorted(unknown)} (expected {sorted(allowed)})")
  if with_grads and "grads" not in out:
    raise ValueError(f"loss function of part {name!r} is an OwnGradients loss but returned "
                     "no out['grads']")
  return loss, metrics, dict(out.get("state") or {}), dict(out.get("carry") or {}), \
      out.get("grads")


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


def check_accumulation(k: int, global_batch_size: int, mesh) -> None:
  """``ConfigError`` unless ``k`` >= 1 micro-batches of ``global_batch_size`` divide over
  the batch axes of ``mesh`` (``config.optimizer.accumulate_steps``; checked at start-up
  by the trainers, again here)."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.optimizer.accumulate_steps={k!r} must be >= 1")
  batch_devices = parallel.batch_devices(mesh)
  if k > 1 and global_batch_size % (k * batch_devices):
    raise ConfigError(
        f"config.optimizer.accumulate_steps={k}: the global batch {global_batch_size} must "
        f"split into {k} micro-batches that divide over the {batch_devices} devices of "
        f"the batch axes (config.batch_size a multiple of {k * batch_devices})")


def make_train_step(setup: TrainSetup, losses: LossFn | Mapping[str, LossFn], *,
                    donate: bool = True, norms_every: int = 1,
                    total_steps: int | None = None,
                    frozen: Mapping[str, FrozenNet] | None = None,
                    accumulate_steps: int = 1,
                    presample: Mapping[str, Callable] | None = None,
                    skip_nonfinite: bool = False,
                    skip_grad_norm_above: float = 0.0,
                    global_batch_size: int | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)`` for the parts of ``setup``.

  ``losses``: one loss function (for a single-part setup) or ``{params_key: loss_fn}``.
  ``norms_every``: the parameter and update norms (two extra passes over the weights) are
  computed only on steps whose count after the update is a multiple of it, or equals
  ``total_steps`` — the steps the loop logs — and are 0 otherwise (``lax.cond``). The
  gradient norm is computed every step (the NaN guard needs it). 1: every step.
  ``frozen``: networks from ``state.freeze`` (their weights become an argument of the
  jitted function; a ``BoundStep`` binds them). Without ``frozen`` the jitted function
  itself is returned. Either way ``step.lower(state, batch)`` lowers it.
  ``accumulate_steps``, ``presample`` (``{params_key: fn(batch, key) -> batch}``),
  ``skip_nonfinite``, ``skip_grad_norm_above``: see the module docstring;
  ``global_batch_size`` lets the accumulation settings be checked up front.
  """
  if norms_every < 1:
    raise ValueError(f"norms_every must be >= 1, got {norms_every}")
  if callable(losses):
    losses = {setup.main.part.params_key: losses}
  unknown = set(losses) - {ps.part.params_key for ps in setup.parts}
  if unknown:
    raise ValueError(f"loss functions for unknown parts {sorted(unknown)}")
  for ps in setup.parts:
    if ps.part.params_key in RESERVED or ps.part.stats_key in RESERVED:
      raise ValueError(f"state keys {RESERVED} are reserved")
  stats_keys = {ps.part.stats_key for ps in setup.parts if ps.part.stats_key}
  k = int(accumulate_steps)
  if global_batch_size is not None or k < 1:
    check_accumulation(k, global_batch_size or 0, setup.mesh)
  presample = dict(presample or {})
  base_key = jax.random.key(setup.seed)
  decay = setup.ema_decay
  prefix = len(setup.parts) > 1
  frozen = dict(frozen or {})

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

  def step_fn(state, batch, frozen_weights=None):
    key = jax.random.fold_in(base_key, state["step"])
    state = dict(state)
    modules = {name: net.module(frozen_weights[name]) for name, net in frozen.items()}
    carry: dict[str, Any] = {}
    all_metrics: dict[str, jax.Array] = {}
    finite = jnp.bool_(True)
    for i, ps in enumerate(setup.parts):
      p = ps.part
      if p.params_key not in losses:
        continue
      loss_fn = losses[p.params_key]
      part_key = key if i == 0 else jax.random.fold_in(key, i)
      ctx = dict(state, carry=dict(carry), frozen=modules)
      stats = state[p.stats_key] if p.stats_key else None

      own_grads = isinstance(loss_fn, OwnGradients)

      def objective(params, mb=batch, loss_fn=loss_fn, ps=ps, part_key=part_key, ctx=ctx,
                    stats=stats, own_grads=own_grads):
        model = ps.model(params, stats)
        loss, metrics, new_state, new_carry, grads = _split_result(
            loss_fn(model, mb, part_key, ctx), ps.part.params_key, own_grads)
        if ps.part.stats_key and ps.part.stats_key not in new_state:
          new_state[ps.part.stats_key] = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return loss, (metrics, new_state, new_carry, grads)

      if k > 1:
        if own_grads or p.stats_key:
          raise ConfigError(f"config.optimizer.accumulate_steps={k}: part {p.params_key!r} "
                           "computes its own gradients or keeps statistics; gradient "
                           "accumulation supports plain loss functions only")

        def micro_objective(params, mb, objective=objective, name=p.params_key):
          loss, (metrics, new_state, new_carry, _) = objective(params, mb)
          if new_state or new_carry:
            raise ConfigError(f"config.optimizer.accumulate_steps={k}: the loss of part "
                             f"{name!r} returns state/carry, which micro-batches cannot "
                             "average")
          return loss, metrics

        part_batch = batch
        if p.params_key in presample:
          part_batch = presample[p.params_key](batch, part_key)
        (loss, metrics), grads = accumulated_value_and_grad(
            micro_objective, state[p.params_key], part_batch, k, setup.mesh,
            setup.state_shardings[p.params_key])
        new_state, new_carry = {}, {}
      elif own_grads:
        loss, (metrics, new_state, new_carry, grads) = objective(state[p.params_key])
        grads = jax.tree.map(lambda g, q: jnp.asarray(g, q.dtype), grads, state[p.params_key])
      else:
        (loss, (metrics, new_state, new_carry, _)), grads = jax.value_and_grad(
            objective, has_aux=True)(state[p.params_key])
      bad = set(new_state) - stats_keys
      if bad:
        raise ValueError(f"loss function of part {p.params_key!r} set state entries "
                         f"{sorted(bad)}; only statistics entries {sorted(stats_keys)} "
                         "may be set")
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
      metrics.update(grad_norm=grad_norm, **_norms(params, updates, state["step"]))
      if p.schedule is not None:
        metrics["lr"] = jnp.asarray(p.schedule(state["step"]), jnp.float32)
      state[p.params_key], state[p.opt_key] = params, opt_state
      for name, v in new_state.items():
        state[name] = jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), v, state[name])
      carry.update(new_carry)
      tag = p.metrics_prefix or p.params_key
      all_metrics.update({(f"{tag}/{k}" if prefix else k): v for k, v in metrics.items()})
    state["step"] = state["step"] + 1
    state["nonfinite"] = state["nonfinite"] + (~finite).astype(jnp.int32)
    return state, all_metrics

  rep = parallel.replicated(setup.mesh)
  batch_sh = parallel.batch_sharding(setup.mesh)
  if not frozen:
    return setup.jit(lambda state, batch: step_fn(state, batch),
                     in_shardings=(setup.state_shardings, batch_sh),
                     out_shardings=(setup.state_shardings, rep),
                     donate_argnums=(0,) if donate else ())
  weights = {name: net.weights for name, net in frozen.items()}
  jitted = setup.jit(step_fn,
                     in_shardings=(setup.state_shardings, batch_sh,
                                   {name: net.shardings for name, net in frozen.items()}),
                     out_shardings=(setup.state_shardings, rep),
                     donate_argnums=(0,) if donate else ())

  return BoundStep(jitted, weights)
