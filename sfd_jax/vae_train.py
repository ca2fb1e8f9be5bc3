"""Training of SFD's two autoencoders: the Semantic VAE and the texture VAE.

  python main.py --mode=train_semvae --config=configs/semvae_ch16.py --workdir=runs/semvae
  python main.py --mode=train_texture_vae --config=configs/texture_vae_f16d32.py --workdir=runs/tvae

One generic loop (``train_model``) for both, with the structure of the DiT trainer
(``sfd_jax.train``): build the mesh and a sharded state from the model's logical axis
names, resume automatically from the workdir's latest checkpoint (else start from
``init_from`` or a random init), build the data iterator at the restored position, then
loop: global batch → jitted step → periodic logging, evaluation, checkpoint,
preemption check.

* State ``{"step", "params", "opt_state", "nonfinite"}``; ``params`` is the pure dict of
  the model's ``nnx.Param`` values, sharded by ``config.sharding_rules`` (default:
  ``parallel.DEFAULT_RULES``) over ``config.mesh``; every optimizer moment gets the
  sharding of the parameter it tracks (``optax.tree_map_params``).
* Step: pure function of (state, global batch), donated state, randomness
  ``fold_in(key(seed), step)`` (the posterior noise of the whole global batch).
* Checkpoints: Orbax composites (state, Grain iterator state, config) every
  ``checkpoint_every_steps``, at the end and on preemption (SIGTERM or Orbax's
  notice, via ``checkpoint.PreemptionGuard``); a rerun continues exactly, so n steps
  straight and k steps + resume to n give identical parameters.
* Logging: clu metric writer (tensorboard + log) and ``ReportProgress``; pass a writer
  to ``train_model`` to replace them (clu imports TensorFlow, ~15 s).

Models and data (``model_kind``):

* ``"semvae"`` — ``SemanticVAE`` on pre-extracted DINOv2 patch features
  (``--mode=extract``; ``extract_features.FeatureRecords``), loss
  ``diffusion.semvae_loss`` (MSE + token-axis cosine + 1e-7·KL), AdamW lr 5e-5,
  weight decay 0.01, warm-up 500 steps from 0.01×, constant, cosine to 0.1× over the
  last 199.5k of 1M steps, batch 64 (SPEC §3.4).
* ``"texture_vae"`` — ``TextureVAE`` on images (``data.images``: folder or TFDS) with
  the ADM centre crop, loss ``diffusion.vae_losses.texture_vae_loss`` (L1 + KL), Adam
  lr 1e-4, β = (0.5, 0.9) (SPEC §4.3). The LPIPS and PatchGAN terms of the LDM recipe
  are not implemented; ``register_generator_term`` is the extension point for extra
  generator-loss terms with frozen parameters (``config.loss.extra_terms`` lists them
  by name). A discriminator needs its own parameters and optimizer step, which this
  loop does not have.

Evaluation (``config.eval.path`` non-empty): every ``eval.every_steps`` one pass over
the evaluation set with the posterior mean — SemVAE: MSE, per-token cosine over
channels (the reference's evaluation metric) and token-axis cosine; texture VAE: L1
and PSNR.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax import checkpoint as ckpt_lib
from sfd_jax import optim, parallel
from sfd_jax.data import global_batch
from sfd_jax.data import images as images_lib
from sfd_jax.data import pipeline
from sfd_jax.data import preprocess
from sfd_jax.diffusion import semvae_loss as semvae_loss_lib
from sfd_jax.diffusion import vae_losses
from sfd_jax.extract_features import FeatureRecords
from sfd_jax.models import semantic_vae, texture_vae

KINDS = ("semvae", "texture_vae")


NonFiniteLossError = ckpt_lib.NonFiniteLossError


# --------------------------------------------- extension point: generator terms

# name -> factory(loss_config) -> term(images, recon, posterior) -> weighted scalar
GENERATOR_TERMS: dict[str, Callable[[ml_collections.ConfigDict],
                                    vae_losses.GeneratorLossTerm]] = {}


def register_generator_term(name: str, factory: Callable[[ml_collections.ConfigDict],
                                                         vae_losses.GeneratorLossTerm]):
  """Registers an extra texture-VAE generator-loss term (e.g. a frozen LPIPS network).

  ``factory(config.loss)`` returns ``term(images, recon, posterior) -> scalar`` (already
  weighted); list ``name`` in ``config.loss.extra_terms`` (comma-separated) to use it.
  The term is traced into the jitted step; parameters it closes over are constants.
  """
  if not name or "," in name:
    raise ValueError(f"generator term name {name!r} must be non-empty without commas")
  GENERATOR_TERMS[name] = factory


def _extra_terms(loss_cfg) -> dict[str, vae_losses.GeneratorLossTerm]:
  names = [n.strip() for n in str(loss_cfg.get("extra_terms", "") or "").split(",")
           if n.strip()]
  unknown = [n for n in names if n not in GENERATOR_TERMS]
  if unknown:
    raise ValueError(f"config.loss.extra_terms: unknown term(s) {unknown}; registered: "
                     f"{sorted(GENERATOR_TERMS)} (see vae_train.register_generator_term)")
  return {n: GENERATOR_TERMS[n](loss_cfg) for n in names}


# ------------------------------------------------------------------ the models


def model_config(config: ml_collections.ConfigDict, kind: str):
  """The model dataclass config from ``config.model`` (minus dtype fields)."""
  fields = {k: v for k, v in config.model.to_dict().items()
            if k not in ("dtype", "param_dtype")}
  try:
    if kind == "semvae":
      return semantic_vae.SemVAEConfig(**fields)
    if kind == "texture_vae":
      cfg = texture_vae.TextureVAEConfig.from_dict(fields)
      if cfg.dropout > 0:
        raise ValueError("dropout > 0 is not supported by the VAE trainer (0 in every "
                         "released model)")
      return cfg
  except TypeError as e:
    raise ValueError(f"config.model does not describe a {kind}: {e}") from e
  raise ValueError(f"model kind {kind!r} not one of {KINDS}")


def _build_model(kind: str, cfg, model_section, seed: int) -> nnx.Module:
  cls = semantic_vae.SemanticVAE if kind == "semvae" else texture_vae.TextureVAE
  return cls(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(model_section.get("dtype", "float32")),
             param_dtype=jnp.dtype(model_section.get("param_dtype", "float32")))


def _train_loss(kind: str, loss_cfg, model, batch, key):
  """(loss, metrics) of one global batch."""
  if kind == "semvae":
    feats = batch["features"].astype(jnp.float32)
    recon, _, kl = model(feats, key)
    loss, terms = semvae_loss_lib.semvae_loss(
        recon, feats, kl, mse_weight=loss_cfg.mse_weight, l1_weight=loss_cfg.l1_weight,
        cos_weight=loss_cfg.cos_weight, kl_weight=loss_cfg.kl_weight,
        cos_axis=loss_cfg.cos_axis)
    terms = dict(terms)
    terms["loss"] = terms.pop("total")
    return loss, terms
  images = preprocess.uint8_to_m11(batch["image"])
  return vae_losses.texture_vae_loss(model, images, key, kl_weight=loss_cfg.kl_weight,
                                     pixel_reduction=loss_cfg.pixel_reduction,
                                     extra_terms=_extra_terms(loss_cfg))


def _eval_metrics(kind: str, model, batch) -> dict[str, jax.Array]:
  """Per-example reconstruction metrics with the posterior mean ([B] arrays)."""
  if kind == "semvae":
    feats = batch["features"].astype(jnp.float32)
    recon = model.decode(model.encode(feats).mode()).astype(jnp.float32)
    cos = semvae_loss_lib.cosine_similarity
    return {"mse": jnp.mean(jnp.square(recon - feats), axis=(1, 2)),
            "cos_sim": jnp.mean(cos(recon, feats, axis=-1), axis=1),
            "cos_sim_token_axis": jnp.mean(cos(recon, feats, axis=1), axis=1)}
  x = preprocess.uint8_to_m11(batch["image"])
  recon = model.decode(model.encode(x).mode()).astype(jnp.float32)
  mse = jnp.mean(jnp.square(recon - x), axis=(1, 2, 3))
  return {"l1": jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3)),
          # pixel range [-1, 1]: peak-to-peak 2
          "psnr": 20.0 * jnp.log10(2.0) - 10.0 * jnp.log10(jnp.maximum(mse, 1e-12))}


# ------------------------------------------------------------------ the setup


@dataclasses.dataclass(frozen=True, eq=False)
class VAESetup:
  """Everything static about a run: model structure, shardings, jitted functions."""
  kind: str
  config: ml_collections.ConfigDict   # model / loss / optimizer / seed sections
  mesh: Mesh
  model_cfg: Any
  graphdef: Any
  abstract_params: Any      # nnx.State of ShapeDtypeStructs
  state_shardings: Any
  abstract_state: Any       # ShapeDtypeStructs with shardings (restore target)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  sharding_notes: tuple[str, ...]
  init: Callable            # init(params | None) -> state
  step: Callable            # step(state, batch) -> (state, metrics)
  evaluate: Callable        # evaluate(params, batch, mask) -> (masked metric sums, count)

  def model(self, params) -> nnx.Module:
    """Merges pure-dict params into a module (inside or outside jit)."""
    state = jax.tree.map(lambda x: x, self.abstract_params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def _spec_leaf(x) -> bool:
  return isinstance(x, P)


def _make_setup(kind: str, cfg: ml_collections.ConfigDict, mesh: Mesh) -> VAESetup:
  model_cfg = model_config(cfg, kind)
  seed = int(cfg.seed)
  abstract_model = nnx.eval_shape(lambda: _build_model(kind, model_cfg, cfg.model, seed))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  params_shape = nnx.to_pure_dict(abstract_params)
  param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  tx, schedule = optim.make_optimizer(cfg.optimizer)
  opt_shape = jax.eval_shape(tx.init, params_shape)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, opt_shape, param_specs,
      transform_non_params=lambda _: P(), is_leaf=_spec_leaf)
  logical = {"step": P(), "nonfinite": P(), "params": param_specs, "opt_state": opt_specs}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "nonfinite": jax.ShapeDtypeStruct((), jnp.int32),
              "params": params_shape, "opt_state": opt_shape}
  rules = [tuple(r) for r in (cfg.get("sharding_rules") or parallel.DEFAULT_RULES)]
  notes: list[str] = []
  shardings = parallel.tree_shardings(abstract, logical, rules, mesh,
                                      strict=bool(cfg.get("strict_sharding", False)),
                                      notes=notes)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  loss_cfg = cfg.loss
  base_key = jax.random.key(seed)

  def merge(params):
    state = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  def init_fn(given):
    if given is None:
      model = _build_model(kind, model_cfg, cfg.model, seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    else:
      params = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), given, params_shape)
    return {"step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
            "params": params, "opt_state": tx.init(params)}

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(
        lambda p: _train_loss(kind, loss_cfg, merge(p), batch, key), has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                   lr=jnp.asarray(schedule(state["step"]), jnp.float32))
    return {"step": state["step"] + 1,
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "params": params, "opt_state": opt_state}, metrics

  rep = NamedSharding(mesh, P())
  batch_sh = parallel.batch_sharding(mesh)
  state_sh = shardings
  options = cfg.get("compiler_options")
  jit = functools.partial(jax.jit, compiler_options=(options.to_dict() if options else None))
  jit_init_fresh = jit(lambda: init_fn(None), out_shardings=state_sh)
  jit_init_given = jit(init_fn, in_shardings=(state_sh["params"],), out_shardings=state_sh)

  def init(given=None):
    with jax.set_mesh(mesh):
      if given is None:
        return jit_init_fresh()
      return jit_init_given(jax.device_put(given, state_sh["params"]))

  step = jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))
  def eval_fn(params, batch, mask):
    per_example = _eval_metrics(kind, merge(params), batch)
    return {k: jnp.sum(v * mask) for k, v in per_example.items()}, jnp.sum(mask)

  evaluate = jit(eval_fn, in_shardings=(state_sh["params"], batch_sh, batch_sh),
                     out_shardings=rep)
  return VAESetup(kind, cfg, mesh, model_cfg, graphdef, abstract_params, shardings,
                  abstract_sharded, tx, schedule, tuple(notes), init, step, evaluate)


@functools.lru_cache(maxsize=8)
def _cached_setup(kind: str, fingerprint: str, mesh: Mesh) -> VAESetup:
  return _make_setup(kind, ml_collections.ConfigDict(json.loads(fingerprint)), mesh)


def build_setup(config: ml_collections.ConfigDict, kind: str, devices=None) -> VAESetup:
  """Mesh, optimizer, shardings and jitted functions for ``config`` (validated).

  Setups are cached per (model, loss, optimizer, seed, sharding) settings and mesh, so
  a second run in the same process (a resume, a test) reuses the compiled step.
  """
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(int(config.batch_size), mesh)
  fingerprint = json.dumps({
      "model": config.model.to_dict(), "loss": config.loss.to_dict(),
      "optimizer": config.optimizer.to_dict(), "seed": int(config.seed),
      "sharding_rules": [list(r) for r in (config.get("sharding_rules") or ())],
      "strict_sharding": bool(config.get("strict_sharding", False)),
      "compiler_options": (config.compiler_options.to_dict()
                           if config.get("compiler_options") else {})}, sort_keys=True)
  setup = _cached_setup(kind, fingerprint, mesh)
  for note in setup.sharding_notes:
    logging.info("sharding: %s", note)
  return setup


def load_init_params(setup: VAESetup, directory: str) -> dict:
  """Pure-dict params from a converted checkpoint folder (``sfd_jax.convert.*``),
  checked against the model (path and shape of every parameter)."""
  from sfd_jax.convert import common  # pylint: disable=import-outside-toplevel
  params, _ = common.load_params(directory)
  model = nnx.clone(setup.model(nnx.to_pure_dict(setup.abstract_params)))
  common.assign(model, params, name=directory)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ------------------------------------------------------------------------ data


class _RandomFlip(grain.transforms.MapWithIndex):
  """Horizontal flip of ``image`` with p = 0.5, a hash of (seed, stream index)."""

  def __init__(self, seed: int):
    self.seed = int(seed)

  def map_with_index(self, index: int, element):
    if element is None or not pipeline.flip_choice(self.seed, index):
      return element
    return dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))


def _source_and_transform(kind: str, config, path_key: str = "path"):
  """(random-access source, per-element transform or None) for ``config.data``."""
  data_cfg = config.data
  if kind == "semvae":
    if not data_cfg.get(path_key):
      raise ValueError(f"config.data.{path_key} is empty: point it at a feature dataset "
                       "written by --mode=extract")
    recs = FeatureRecords(data_cfg[path_key])
    if recs.spec.dim != config.model.input_dim:
      raise ValueError(f"{recs.directory}: features of width {recs.spec.dim}, but "
                       f"config.model.input_dim is {config.model.input_dim}")
    semantic_vae.token_grid(recs.spec.num_tokens)  # the posterior needs a square grid
    return recs, None
  section = dict(data_cfg.to_dict(), path=data_cfg.get(path_key))
  if path_key == "eval_path":  # evaluation images always come from a folder
    section["source"] = "folder"
  return (images_lib.make_source(section),
          images_lib.CenterCropTransform(int(data_cfg.image_size)))


def make_train_iterator(config: ml_collections.ConfigDict, kind: str,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Checkpointable iterator over this process's part of the global batches.

  Global shuffle (reseeded every epoch), endless repeat, per-process slice
  ``[process_index::process_count]``, batch. Texture VAE: ADM centre crop (unreadable
  images are logged and dropped) and optional random flip. Its state (``get_state``)
  is small JSON stored in every checkpoint.
  """
  pipeline.ensure_absl_flags_parsed()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  d = config.data
  source, transform = _source_and_transform(kind, config)
  ds = grain.MapDataset.source(source).shuffle(seed=int(config.seed)).repeat(None)
  if transform is not None:
    ds = ds.map(transform)
    if d.get("random_flip", False):
      ds = ds.map_with_index(_RandomFlip(int(config.seed)))
  ds = ds[pi::pc]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(d.read_threads),
                                            prefetch_buffer_size=int(d.prefetch_batches)))
  it = it.batch(int(config.batch_size) // pc, drop_remainder=True)
  if int(d.num_workers) > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)),
                        worker_init_fn=pipeline.ensure_absl_flags_parsed)
  return iter(it)


def _eval_batches(config, kind: str) -> Iterator[tuple[dict, np.ndarray]]:
  """One ordered pass over ``config.data.eval_path``: (this process's batch, mask) per
  global batch. Unreadable images and the tail are padded (mask 0), so every process
  runs the same number of steps. Elements are read with ``data.read_threads`` threads.
  """
  source, transform = _source_and_transform(kind, config, path_key="eval_path")
  load = (lambda i: source[i]) if transform is None else (lambda i: transform(source[i]))
  pi, pc = jax.process_index(), jax.process_count()
  local = int(config.batch_size) // pc
  total = len(source)
  if config.eval.get("max_examples", 0):
    total = min(total, int(config.eval.max_examples))
  template = next((e for e in map(load, range(total)) if e is not None), None)
  if template is None:
    raise ValueError(f"config.data.eval_path {config.data.eval_path}: no readable example")
  with concurrent.futures.ThreadPoolExecutor(max(1, int(config.data.read_threads))) as pool:
    for start in range(0, total, local * pc):
      ids = range(start + pi * local, start + (pi + 1) * local)
      elems = list(pool.map(lambda i: load(i) if i < total else None, ids))
      batch = {k: np.stack([np.asarray((e or template)[k]) for e in elems])
               for k in template}
      yield batch, np.asarray([e is not None for e in elems], bool)


def evaluate(setup: VAESetup, config, params) -> dict[str, float]:
  """Mean per-example metrics over the evaluation set (``config.data.eval_path``)."""
  sums: dict[str, float] = {}
  count = 0.0
  spec = P(parallel.BATCH_AXES)
  for batch, mask in _eval_batches(config, setup.kind):
    out, n = setup.evaluate(params, global_batch.to_global(batch, setup.mesh, spec),
                            global_batch.to_global(mask.astype(np.float32), setup.mesh, spec))
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    count += float(n)
  return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()}


# ------------------------------------------------------------------------ loop


def _default_writer(workdir: str, is_main: bool, num_steps: int, every: int):
  """clu metric writer and progress hook (imported here: clu pulls in TensorFlow)."""
  from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=every)]
  return writer, hooks


def train_model(config: ml_collections.ConfigDict, workdir: str, model_kind: str, *,
                writer=None, devices=None) -> dict[str, Any]:
  """Trains (or resumes) ``model_kind`` ("semvae" | "texture_vae") in ``workdir``.

  Args:
    config: run config (``configs/semvae_ch16.py``, ``configs/texture_vae_f16d32.py``).
    workdir: checkpoints (``<workdir>/checkpoints``) and logs.
    model_kind: which autoencoder.
    writer: a clu-style metric writer (``write_scalars``, ``write_hparams``,
      ``flush``); default: clu's default writer plus a ``ReportProgress`` hook.
    devices: devices of the mesh (default: all).

  Returns:
    ``{"step", "metrics" (last logged), "state"}``.
  """
  os.makedirs(workdir, exist_ok=True)
  setup = build_setup(config, model_kind, devices)
  mesh = setup.mesh
  is_main = jax.process_index() == 0
  total = int(config.num_train_steps)
  every = int(config.log_every_steps)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.keep_checkpoints,
                               keep_period=config.keep_period or None)
  data_it = make_train_iterator(config, model_kind)
  resumed = ckpt.resume(setup.abstract_state, data_it, model_kind)
  if resumed is not None:
    state, start = resumed
  else:
    start = 0
    given = None
    if config.get("init_from"):
      logging.info("%s: initialising from converted checkpoint %s", model_kind,
                   config.init_from)
      given = load_init_params(setup, config.init_from)
    state = setup.init(given)
  logging.info("%s: %s parameters, mesh %s, global batch %d, steps %d → %d", model_kind,
               f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params'])):,}",
               dict(mesh.shape), config.batch_size, start, total)

  hooks = []
  if writer is None:
    writer, hooks = _default_writer(workdir, is_main, total, every)
  if start == 0:
    writer.write_hparams(ckpt_lib.hparams(config))
  eval_every = int(config.eval.get("every_steps", 0)) if config.data.get("eval_path") else 0
  spec = P(parallel.BATCH_AXES)
  cfg_dict = config.to_dict()
  last: dict[str, Any] = {}
  t_log, step, logged_step = time.time(), start, start
  with ckpt_lib.PreemptionGuard() as guard:
    while step < total:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = global_batch.to_global(next(data_it), mesh, spec)
        state, metrics = setup.step(state, batch)
      step += 1
      for h in hooks:
        h(step)
      if step % every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
          ckpt_lib.check_finite(state, step, ckpt)
        m["examples_per_sec"] = ((step - logged_step) * config.batch_size
                                 / max(time.time() - t_log, 1e-9))
        t_log, logged_step = time.time(), step
        writer.write_scalars(step, m)
        last = m
      if eval_every and (step % eval_every == 0 or step == total):
        writer.write_scalars(step, evaluate(setup, config, state["params"]))
      if step == config.get("debug_preempt_at_step", -1):
        os.kill(os.getpid(), signal.SIGTERM)      # tests: a real SIGTERM at this step
      preempt = guard.requested or ckpt.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or step == total or preempt:
        ckpt_lib.check_finite(state, step, ckpt)
        ckpt.save(step, state, data_it.get_state(), cfg_dict)
      if preempt:
        logging.warning("%s: preempted (%s): saved step %d, exiting", model_kind,
                        guard.signal_name or "orbax", step)
        break
  ckpt.close()
  writer.flush()
  if hasattr(data_it, "close"):
    data_it.close()
  return {"step": step, "metrics": last, "state": state}


# ---------------------------------------------------------------------- export


def _str_keys(tree):
  return {str(k): (_str_keys(v) if isinstance(v, Mapping) else np.asarray(v))
          for k, v in tree.items()}


def export_converted(config: ml_collections.ConfigDict, workdir: str, model_kind: str,
                     dst: str, step: int | None = None, force: bool = False,
                     devices=None) -> str:
  """Writes the parameters of a training checkpoint as a converted-weights folder.

  The folder has the layout of the converters' output (``common.save_params`` +
  ``meta.json`` with the model config), so ``--mode=encode`` reads it like converted
  reference weights (``config.encode.semvae`` / ``.texture_vae``). ``devices``: those of
  the training mesh when it did not use all devices.
  """
  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert import common
  from sfd_jax.convert import texture_vae as tvae_convert
  setup = build_setup(config, model_kind, devices)
  state, step, _ = ckpt_lib.restore_state_only(os.path.join(workdir, "checkpoints"),
                                               setup.abstract_state, step)
  params = _str_keys(jax.device_get(state["params"]))
  source = f"{os.path.abspath(workdir)} step {step}"
  if model_kind == "texture_vae":
    return tvae_convert.save_converted(dst, params, setup.model_cfg, source=source,
                                       force=force)
  meta = {"model": "semantic_vae", "config": dataclasses.asdict(setup.model_cfg),
          "source": source}
  return common.save_params(dst, params, meta=meta, force=force)


def main(argv) -> None:
  """``python -m sfd_jax.vae_train --config=... --workdir=... --kind=... --dst=...``."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  out = export_converted(f.config, f.workdir, f.kind, f.dst, f.step if f.step >= 0 else None,
                         f.force)
  print(f"wrote {out}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "training config (path[:args])")
  flags.DEFINE_string("workdir", None, "training workdir (holds checkpoints/)")
  flags.DEFINE_enum("kind", "semvae", list(KINDS), "which autoencoder")
  flags.DEFINE_string("dst", None, "output folder")
  flags.DEFINE_integer("step", -1, "checkpoint step (-1: latest)")
  flags.DEFINE_bool("force", False, "overwrite a non-empty --dst")
  flags.mark_flags_as_required(["config", "workdir", "dst"])
  app.run(main)
