"""The one sharded train-state builder of every trainer (SFD DiT, Semantic VAE, texture VAE).

A train state is a plain pytree::

  {"step": int32[], "nonfinite": int32[],
   "<part>": params, "<part's opt>": optax state, ["<part's ema>": params], ...}

with one *trainable part* per optimizer (one for the DiT and the VAEs; a GAN adds a
discriminator part with its own optimizer). For the DiT the keys are ``params``,
``opt_state`` and ``ema``; for the VAEs ``params`` and ``opt_state``.

Built in one way for all: abstract shapes (``nnx.eval_shape``) → logical axis names →
shardings from the rule table → ``jax.jit(init, out_shardings=...)``, so no device ever
holds a whole model. Optimizer moments follow the parameter they track
(``optax.tree_map_params``); every other optimizer leaf is replicated.
``nonfinite`` counts steps whose loss or gradient norm was NaN/Inf (the loop checks it
before every save).

A part whose module keeps non-trainable state (BatchNorm running statistics,
``nnx.BatchStat``: the GAN discriminator) names a ``stats_key``; that entry holds the
pure dict of those variables, replicated or sharded like parameters, and is
checkpointed with the rest. Parts without one are split on ``nnx.Param`` alone.

Frozen networks of a run (LPIPS, a foundation model) are not state: ``freeze`` places
their weights on the mesh by the same logical rules, and the step builder passes them to
the jitted step as an argument (not as constants baked into the program, and never
checkpointed).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.core import trees


@dataclasses.dataclass(frozen=True)
class Part:
  """One trainable network of a run: how to build it, its optimizer, its state keys."""
  build: Callable[[], nnx.Module]         # builds the module (random init, seeded)
  tx: optax.GradientTransformation
  schedule: optax.Schedule | None = None
  params_key: str = "params"
  opt_key: str = "opt_state"
  ema_key: str | None = None               # e.g. "ema": an EMA copy of the params
  stats_key: str | None = None             # e.g. "disc_stats": the module's nnx.BatchStat
  metrics_prefix: str | None = None        # metric-name prefix with several parts
                                           # (default: params_key)


@dataclasses.dataclass(frozen=True, eq=False)
class PartSetup:
  """The static structure of one part (module graph, abstract params, specs)."""
  part: Part
  graphdef: Any
  abstract_params: Any       # nnx.State of ShapeDtypeStructs (with logical metadata)
  abstract_stats: Any = None  # nnx.State of the BatchStat variables (stats_key parts)

  def model(self, params, stats=None) -> nnx.Module:
    """Merges pure-dict params (and statistics) into a module (inside or outside jit)."""
    state = jax.tree.map(lambda x: x, self.abstract_params)
    nnx.replace_by_pure_dict(state, params)
    if self.abstract_stats is None:
      return nnx.merge(self.graphdef, state)
    if stats is None:
      raise ValueError(f"part {self.part.params_key!r} keeps statistics "
                       f"({self.part.stats_key!r}): pass them to model()")
    st = jax.tree.map(lambda x: x, self.abstract_stats)
    nnx.replace_by_pure_dict(st, stats)
    return nnx.merge(self.graphdef, state, st)


@dataclasses.dataclass(eq=False)
class TrainSetup:
  """Everything static about a training run (built once, shared by init and step).

  The first part is the main one: ``model``, ``tx``, ``schedule``, ``graphdef`` and
  ``abstract_params`` refer to it. ``model_cfg`` / ``obj_cfg`` / ``ema_decay`` are the
  trainer's own settings, kept here so that hooks (periodic evaluation) can read them.
  """
  mesh: Mesh
  rules: Any
  parts: tuple[PartSetup, ...]
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (restore target)
  sharding_notes: list[str]
  seed: int
  model_cfg: Any = None
  obj_cfg: Any = None
  ema_decay: float | None = None
  compiler_options: Mapping[str, Any] | None = None

  @property
  def main(self) -> PartSetup:
    return self.parts[0]

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.main.part.tx

  @property
  def schedule(self) -> optax.Schedule | None:
    return self.main.part.schedule

  @property
  def graphdef(self):
    return self.main.graphdef

  @property
  def abstract_params(self):
    return self.main.abstract_params

  def model(self, params) -> nnx.Module:
    return self.main.model(params)

  def jit(self, fn, **kw):
    """``jax.jit`` with the run's XLA compiler options."""
    return jax.jit(fn, compiler_options=dict(self.compiler_options or {}) or None, **kw)


def _spec_leaf(x) -> bool:
  return isinstance(x, P)


def build_setup(parts: Sequence[Part], mesh: Mesh, *, rules=parallel.DEFAULT_RULES,
                seed: int = 0, strict_sharding: bool = False, model_cfg=None, obj_cfg=None,
                ema_decay: float | None = None,
                compiler_options: Mapping[str, Any] | None = None) -> TrainSetup:
  """Abstract state, logical specs and shardings of ``parts`` on ``mesh``."""
  abstract: dict[str, Any] = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                              "nonfinite": jax.ShapeDtypeStruct((), jnp.int32)}
  logical: dict[str, Any] = {"step": P(), "nonfinite": P()}
  setups = []
  for part in parts:
    abstract_stats = None
    if part.stats_key:
      graphdef, abstract_params, abstract_stats = nnx.split(
          nnx.eval_shape(part.build), nnx.Param, nnx.BatchStat)
      abstract[part.stats_key] = nnx.to_pure_dict(abstract_stats)
      logical[part.stats_key] = nnx.to_pure_dict(nnx.get_partition_spec(abstract_stats))
    else:
      graphdef, abstract_params = nnx.split(nnx.eval_shape(part.build), nnx.Param)
    shapes = nnx.to_pure_dict(abstract_params)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    opt_shape = jax.eval_shape(part.tx.init, shapes)
    opt_specs = optax.tree_map_params(part.tx, lambda _, spec: spec, opt_shape, specs,
                                      transform_non_params=lambda _: P(), is_leaf=_spec_leaf)
    abstract[part.params_key], logical[part.params_key] = shapes, specs
    abstract[part.opt_key], logical[part.opt_key] = opt_shape, opt_specs
    if part.ema_key:
      abstract[part.ema_key], logical[part.ema_key] = shapes, specs
    setups.append(PartSetup(part, graphdef, abstract_params, abstract_stats))
  notes: list[str] = []
  shardings = parallel.tree_shardings(abstract, logical, [tuple(r) for r in rules], mesh,
                                      strict=strict_sharding, notes=notes)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return TrainSetup(mesh, rules, tuple(setups), shardings, abstract_sharded, notes, seed,
                    model_cfg=model_cfg, obj_cfg=obj_cfg, ema_decay=ema_decay,
                    compiler_options=compiler_options)


@functools.lru_cache(maxsize=16)
def _jitted_init(setup: TrainSetup, given):
  """``given``: False (random init), True (every main-part leaf given) or a tuple of
  bools over the main part's leaves (False: that leaf keeps its random init)."""
  parts = setup.parts

  def init(given_params):
    state = {"step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32)}
    for i, ps in enumerate(parts):
      p = ps.part
      if i == 0 and given_params is not None:
        target = setup.abstract_state[p.params_key]
        if isinstance(given, tuple):     # some leaves from the random init
          fresh, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(p.build(), nnx.Param)))
          supplied = iter(given_params)
          leaves = [jnp.asarray(next(supplied), f.dtype) if g else f
                    for g, f in zip(given, fresh)]
          params = jax.tree.unflatten(treedef, leaves)
        else:
          params = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), given_params, target)
        module = None
      else:
        module = p.build()
        params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
      if p.stats_key:
        module = module if module is not None else p.build()
        state[p.stats_key] = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
      state[p.params_key] = params
      state[p.opt_key] = p.tx.init(params)
      if p.ema_key:
        state[p.ema_key] = jax.tree.map(jnp.copy, params)   # EMA starts as a copy
    return state

  sh = setup.state_shardings
  if isinstance(given, tuple):
    leaf_sh = jax.tree.leaves(sh[parts[0].part.params_key])
    return setup.jit(init, in_shardings=([s for g, s in zip(given, leaf_sh) if g],),
                     out_shardings=sh)
  if given:
    return setup.jit(init, in_shardings=(sh[parts[0].part.params_key],), out_shardings=sh)
  return setup.jit(lambda: init(None), out_shardings=sh)


def create_train_state(setup: TrainSetup, init_params: Any | None = None):
  """Initialises the state sharded over the mesh.

  ``init_params`` (a pure dict, e.g. from a converted checkpoint) replaces the random
  initialisation of the main part; leaves it lacks keep their random initialisation
  (a partial start, e.g. ``init_from`` with ``init_from_mode="shape_check"``). An EMA
  starts as a copy of the initial parameters.
  """
  with jax.set_mesh(setup.mesh):
    if init_params is None:
      return _jitted_init(setup, False)()
    key = setup.main.part.params_key
    sh = setup.state_shardings[key]
    paths = sorted(trees.flatten(setup.abstract_state[key], None))   # jax.tree's order
    given = set(trees.flatten(init_params, None))
    if not given - set(paths) and set(paths) <= given:
      return _jitted_init(setup, True)(jax.device_put(init_params, sh))
    extra = sorted("/".join(map(str, q)) for q in given - set(paths))
    if extra:
      raise ValueError(f"initial parameters match no parameter of the model: {extra[:10]}")
    mask = tuple(path in given for path in paths)
    leaf_sh = jax.tree.leaves(sh)

    def leaf(tree, path):
      for k in path:
        tree = tree[k]
      return tree
    supplied = [jax.device_put(leaf(init_params, q), s)
                for q, s, g in zip(paths, leaf_sh, mask) if g]
    return _jitted_init(setup, mask)(supplied)


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenNet:
  """A frozen network of a run: its graph and its weights placed on the mesh.

  ``weights`` (pure dict of every variable) is what the step receives as an argument;
  ``module(weights)`` rebuilds the network inside the step.
  """
  graphdef: Any
  abstract: Any              # nnx.State of the network's variables (structure only)
  weights: Any               # pure dict of jax.Arrays, sharded by ``shardings``
  shardings: Any

  def module(self, weights) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.abstract)
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(self.graphdef, state)


def freeze(setup: TrainSetup, nets: Mapping[str, nnx.Module]) -> dict[str, FrozenNet]:
  """Places frozen networks on ``setup.mesh`` by the run's logical rules.

  Each weight is sharded as a parameter of the same logical axes would be (replicated
  where a rule maps to no mesh axis); built from host copies with
  ``jax.make_array_from_callback``, so it works on several processes. A network built
  with ``nnx.eval_shape`` (no weights) gets abstract weights (``ShapeDtypeStruct``s
  with their shardings): enough to lower and compile the step, e.g. for another device
  kind (``sfd_jax.planning``).
  """
  out = {}
  for name, net in nets.items():
    graphdef, state = nnx.split(net)
    pure = nnx.to_pure_dict(state)
    abstract_net = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(pure))
    host = pure if abstract_net else jax.tree.map(np.asarray, pure)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shardings = parallel.tree_shardings(host, specs, [tuple(r) for r in setup.rules],
                                        setup.mesh)
    if abstract_net:
      weights = jax.tree.map(
          lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), host, shardings)
    else:
      weights = jax.tree.map(
          lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]),
          host, shardings)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    out[name] = FrozenNet(graphdef, abstract, weights, shardings)
  return out
