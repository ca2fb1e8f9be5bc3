"""Sharded train state and the pure, jitted SFD update.

The train state is a plain pytree::

  {"step": int32[], "params": {...}, "ema": {...}, "opt_state": optax state,
   "nonfinite": int32[]}

``params``/``ema`` are pure dicts of the model's ``nnx.Param`` values (the model's
``graphdef`` is kept aside and merged inside the step). Shardings come from the logical
axis names of the parameters and the config's rule table; the optimizer moments inherit
the sharding of the parameter they track. The state is created *already sharded*:
``jax.jit(init, out_shardings=...)`` — no device ever holds the whole model.

``nonfinite`` counts steps whose loss or gradient norm was NaN/Inf; the loop checks it
before every checkpoint save and stops the run instead of saving.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.diffusion import objective as obj_lib
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a training run (built once, shared by init and step)."""
  model_cfg: DiTConfig
  obj_cfg: obj_lib.ObjectiveConfig
  mesh: Mesh
  rules: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  ema_decay: float
  seed: int
  graphdef: Any
  abstract_params: Any       # nnx.State of ShapeDtypeStructs (with logical metadata)
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (restore target)
  sharding_notes: list[str]

  def model(self, params) -> LightningDiT:
    """Merges pure-dict params into a module (inside or outside jit)."""
    state = jax.tree.map(lambda x: x, self.abstract_params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _follow_params(abstract_tree, param_specs_flat):
  """Logical specs for an optimizer-state tree: a leaf whose dict-key path and shape
  match a parameter gets that parameter's spec; anything else is replicated."""
  def one(path, leaf):
    hit = param_specs_flat.get(_dict_path(path))
    if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
      return hit[0]
    return P()
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def build_setup(model_cfg: DiTConfig, obj_cfg: obj_lib.ObjectiveConfig, mesh: Mesh,
                tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                rules=parallel.DEFAULT_RULES, ema_decay: float = 0.9999, seed: int = 0,
                strict_sharding: bool = False) -> TrainSetup:
  abstract_model = nnx.eval_shape(lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  params_shape = nnx.to_pure_dict(abstract_params)
  param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  flat = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, P))[0]:
    flat[_dict_path(path)] = spec
  shapes = {_dict_path(p): l.shape
            for p, l in jax.tree_util.tree_flatten_with_path(params_shape)[0]}
  flat = {k: (v, shapes[k]) for k, v in flat.items()}
  opt_shape = jax.eval_shape(tx.init, params_shape)
  logical = {
      "step": P(), "nonfinite": P(), "params": param_specs, "ema": param_specs,
      "opt_state": _follow_params(opt_shape, flat),
  }
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "nonfinite": jax.ShapeDtypeStruct((), jnp.int32),
              "params": params_shape, "ema": params_shape, "opt_state": opt_shape}
  notes: list[str] = []
  shardings = parallel.tree_shardings(abstract, logical, rules, mesh, strict=strict_sharding,
                                      notes=notes)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return TrainSetup(model_cfg, obj_cfg, mesh, rules, tx, schedule, ema_decay, seed, graphdef,
                    abstract_params, shardings, abstract_sharded, notes)


def create_train_state(setup: TrainSetup, init_params: Any | None = None):
  """Initialises the state sharded over the mesh.

  ``init_params`` (a pure dict, e.g. from a converted checkpoint) replaces the random
  initialisation; the EMA starts as a copy of the initial parameters (never zero).
  """
  cfg, tx, seed = setup.model_cfg, setup.tx, setup.seed

  def init(given):
    if given is None:
      params = nnx.to_pure_dict(nnx.state(LightningDiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    else:
      params = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), given,
                            setup.abstract_state["params"])
    return {"step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
            "params": params, "ema": jax.tree.map(jnp.copy, params),
            "opt_state": tx.init(params)}

  with jax.set_mesh(setup.mesh):
    if init_params is None:
      return jax.jit(lambda: init(None), out_shardings=setup.state_shardings)()
    in_sh = setup.state_shardings["params"]
    given = jax.device_put(init_params, in_sh)
    return jax.jit(init, in_shardings=(in_sh,), out_shardings=setup.state_shardings)(given)


def _global_norm(tree) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def loss_and_metrics(setup: TrainSetup, params, batch: dict[str, jax.Array], key: jax.Array):
  model = setup.model(params)
  obj_cfg = setup.obj_cfg
  repa_target = batch.get("repa") if obj_cfg.repa_active else None
  want_repa = repa_target is not None and setup.model_cfg.use_repa

  act = NamedSharding(setup.mesh, P(parallel.BATCH_AXES))

  def apply_fn(xt, t_tex, t_sem, y, drop_key):
    out = model(xt, t_tex, t_sem, y, label_drop_key=drop_key, return_repa=want_repa,
                activation_sharding=act)
    return out if want_repa else (out, None)

  loss, metrics = obj_lib.training_losses(apply_fn, batch["latent"], batch["label"], key,
                                          obj_cfg, repa_target=repa_target)
  metrics.pop("per_example")
  return loss, metrics


def make_train_step(setup: TrainSetup, donate: bool = True) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)``, jitted with explicit shardings.

  Randomness: ``fold_in(key(seed), step)`` — noise, times and label dropout of the
  *global* batch are drawn from it, so every example (on every device) differs and a
  resumed run replays exactly.
  """
  base_key = jax.random.key(setup.seed)
  tx, decay = setup.tx, setup.ema_decay

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(lambda p: loss_and_metrics(setup, p, batch, key),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                       state["ema"], params)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics.update(grad_norm=grad_norm, param_norm=_global_norm(params),
                   update_norm=_global_norm(updates),
                   lr=jnp.asarray(setup.schedule(state["step"]), jnp.float32))
    new_state = {"step": state["step"] + 1,
                 "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
                 "params": params, "ema": ema, "opt_state": opt_state}
    return new_state, metrics

  rep = NamedSharding(setup.mesh, P())
  batch_sh = parallel.batch_sharding(setup.mesh)
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, rep),
                 donate_argnums=(0,) if donate else ())
