"""Training of SFD's two autoencoders: the Semantic VAE and the texture VAE.

  python main.py --mode=train_semvae --config=configs/semvae_ch16.py --workdir=runs/semvae
  python main.py --mode=train_texture_vae --config=configs/texture_vae_f16d32.py --workdir=runs/tvae

Both run on the training core, exactly like the DiT trainer (``sfd_jax.training.sfd``):
the state builder (``training.state``), the step builder (``training.step``) and the
loop (``training.loop``: resume from the workdir, else ``init_from``, else a random
init; global batch → jitted step → logging, evaluation, checkpoint, preemption check).

* State ``{"step", "params", "opt_state", "nonfinite"}`` (a GAN run adds
  ``disc_params``, ``disc_opt_state``, ``disc_stats``); ``params`` is the pure dict of
  the model's ``nnx.Param`` values, sharded by ``config.sharding_rules`` (default:
  ``parallel.DEFAULT_RULES``) over ``config.mesh``; every optimizer moment gets the
  sharding of the parameter it tracks (``optax.tree_map_params``).
* Step: pure function of (state, global batch), donated state, randomness
  ``fold_in(key(seed), step)`` (the posterior noise of the whole global batch).
* Checkpoints: Orbax composites (state, Grain iterator state, config) every
  ``checkpoint_every_steps``, at the end and on preemption (SIGTERM or Orbax's
  notice, via ``checkpoint.PreemptionGuard``); a rerun continues exactly, so n steps
  straight and k steps + resume to n give identical parameters.
* Logging: the core's metric writer (TensorBoard + log) and progress hook; pass a writer
  to ``train_model`` to replace them.

Models and data (``model_kind``):

* ``"semvae"`` — ``SemanticVAE`` on pre-extracted DINOv2 patch features
  (``--mode=extract``; ``sfd_jax.data.features.FeatureRecords``), loss
  ``diffusion.semvae_loss`` (MSE + token-axis cosine + 1e-7·KL), AdamW lr 5e-5,
  weight decay 0.01, warm-up 500 steps from 0.01×, constant, cosine to 0.1× over the
  last 199.5k of 1M steps, batch 64 (SPEC §3.4).
* ``"texture_vae"`` — ``TextureVAE`` on images (``data.images``: folder or TFDS) with
  the ADM centre crop. Two objectives (``config.loss.name``):

  - ``"l1_kl"`` (default): ``diffusion.vae_losses.texture_vae_loss`` (L1 + KL), Adam
    lr 1e-4, β = (0.5, 0.9) (SPEC §4.3); ``register_generator_term`` is the extension
    point for extra generator-loss terms with frozen parameters
    (``config.loss.extra_terms`` lists them by name);
  - ``"ldm"``: the LDM / VA-VAE recipe (``LPIPSWithDiscriminator``: L1 + LPIPS, KL,
    PatchGAN with the adaptive weight from ``disc_start``, optional VF alignment to
    DINOv2 ViT-L/14), a second trainable part for the discriminator with its own
    optimizer and BatchNorm statistics, on the same core: ``training.texture_gan``.

  ``config.ema_decay`` > 0 keeps an EMA of the autoencoder (state key ``ema``).

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
import os
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax import checkpoint, parallel
from sfd_jax.convert import common
from sfd_jax.convert import texture_vae as tvae_convert
from sfd_jax.core import errors, trees
from sfd_jax.data import global_batch
from sfd_jax.data import images as images_lib
from sfd_jax.data import pipeline
from sfd_jax.data import preprocess
from sfd_jax.diffusion import semvae_loss as semvae_loss_lib
from sfd_jax.diffusion import vae_losses
from sfd_jax.data.features import FeatureRecords
from sfd_jax.models import semantic_vae, texture_vae
from sfd_jax.training import loop, optim
from sfd_jax.training import state as state_lib
from sfd_jax.training import texture_gan
from sfd_jax.training import step as step_lib
from sfd_jax.training.loop import NonFiniteLossError  # noqa: F401  (re-exported)
from sfd_jax.training.state import Part, TrainSetup, create_train_state

KINDS = ("semvae", "texture_vae")


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
    raise errors.ConfigError(f"config.loss.extra_terms: unknown term(s) {unknown}; "
                             f"registered: {sorted(GENERATOR_TERMS)} (see "
                             "sfd_jax.training.vae.register_generator_term)")
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
        raise errors.ConfigError("config.model.dropout > 0 is not supported by the VAE "
                                 "trainer (0 in every released model); set it to 0")
      return cfg
  except errors.UserError:
    raise
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.model does not describe a {kind}: {e}") from e
  raise ValueError(f"model kind {kind!r} not one of {KINDS}")


def validate_config(config: ml_collections.ConfigDict, kind: str) -> None:
  """Ranges and types of a VAE training config, before anything is built or compiled."""
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  errors.require_sections(
      config, ("model", "loss", "optimizer", "data", "mesh"), mode=f"train_{kind}",
      example="configs/semvae_ch16.py" if kind == "semvae" else "configs/texture_vae_f16d32.py")
  loop.validate_config(config)
  e = errors
  rules = [
      ("data.num_workers", e.non_negative_int, "an integer >= 0 (0: read in-process)"),
      ("data.read_threads", e.positive_int, "an integer > 0"),
      ("data.prefetch_batches", e.positive_int, "an integer > 0"),
      ("eval.every_steps", e.non_negative_int, "an integer >= 0 (0: off)"),
      ("eval.max_examples", e.non_negative_int, "an integer >= 0 (0: all)"),
      ("loss.kl_weight", e.non_negative_number, "a number >= 0"),
  ]
  if kind == "semvae":
    rules += [(f"loss.{k}", e.non_negative_number, "a number >= 0")
              for k in ("mse_weight", "l1_weight", "cos_weight")]
    rules += [("loss.cos_axis", e.one_of(("token", "channel")), "'token' or 'channel'")]
  else:
    rules += [("data.image_size", e.positive_int, "an integer > 0 (the ADM centre crop)"),
              ("loss.pixel_reduction", e.one_of(("sum", "mean")), "'sum' or 'mean'")]
  e.check_fields(config, rules)
  model_config(config, kind)
  if kind == "texture_vae":
    _extra_terms(config.loss)


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
  """A VAE run on the training core: the core's setup plus the jitted step and the
  evaluation function. Attributes of the core setup (``mesh``, ``abstract_state``,
  ``state_shardings``, ``model(params)``, ...) are reachable directly."""
  kind: str
  core: TrainSetup
  step: Callable            # step(state, batch) -> (state, metrics)
  evaluate: Callable        # evaluate(params, batch, mask) -> (masked metric sums, count)

  def __getattr__(self, name):
    return getattr(self.core, name)

  def init(self, given=None):
    return create_train_state(self.core, given)


def _make_setup(kind: str, cfg: ml_collections.ConfigDict, mesh: Mesh,
                frozen_nets=None) -> VAESetup:
  model_cfg = model_config(cfg, kind)
  seed = int(cfg.seed)
  options = cfg.get("compiler_options")
  options = options.to_dict() if options else None
  if kind == "texture_vae" and texture_gan.uses_gan_objective(cfg.loss):
    gan = texture_gan.build(cfg, mesh, model_cfg, compiler_options=options,
                            frozen_nets=frozen_nets)
    core, step = gan.core, gan.step
  else:
    tx, schedule = optim.make_optimizer(cfg.optimizer)
    ema = float(cfg.get("ema_decay", 0.0) or 0.0)
    core = state_lib.build_setup(
        [Part(build=lambda: _build_model(kind, model_cfg, cfg.model, seed), tx=tx,
              schedule=schedule, ema_key="ema" if ema > 0 else None)], mesh,
        rules=cfg.get("sharding_rules") or parallel.DEFAULT_RULES, seed=seed,
        strict_sharding=bool(cfg.get("strict_sharding", False)), model_cfg=model_cfg,
        ema_decay=ema if ema > 0 else None, compiler_options=options)
    loss_cfg = cfg.loss
    step = step_lib.make_train_step(
        core, lambda model, batch, key, _: _train_loss(kind, loss_cfg, model, batch, key))

  def eval_fn(params, batch, mask):
    per_example = _eval_metrics(kind, core.model(params), batch)
    return {k: jnp.sum(v * mask) for k, v in per_example.items()}, jnp.sum(mask)

  batch_sh = parallel.batch_sharding(mesh)
  evaluate_fn = core.jit(eval_fn, in_shardings=(core.state_shardings["params"], batch_sh,
                                                batch_sh),
                         out_shardings=NamedSharding(mesh, P()))
  return VAESetup(kind, core, step, evaluate_fn)


@functools.lru_cache(maxsize=8)
def _cached_setup(kind: str, fingerprint: str, mesh: Mesh) -> VAESetup:
  return _make_setup(kind, ml_collections.ConfigDict(json.loads(fingerprint)), mesh)


def build_setup(config: ml_collections.ConfigDict, kind: str, devices=None,
                frozen_nets=None) -> VAESetup:
  """Mesh, optimizer, shardings and jitted functions for ``config`` (validated).

  Setups are cached per (model, loss, optimizer, seed, sharding) settings and mesh, so
  a second run in the same process (a resume, a test) reuses the compiled step.
  ``frozen_nets``: the GAN recipe's frozen networks to use instead of loading them
  (``texture_gan.build``; not cached).
  """
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(int(config.batch_size), mesh)
  if frozen_nets is not None:
    return _make_setup(kind, config, mesh, frozen_nets)
  fingerprint = json.dumps({
      "model": config.model.to_dict(), "loss": config.loss.to_dict(),
      "optimizer": config.optimizer.to_dict(), "seed": int(config.seed),
      "disc_optimizer": (config.disc_optimizer.to_dict()
                         if config.get("disc_optimizer") else None),
      "ema_decay": float(config.get("ema_decay", 0.0) or 0.0),
      "data": {"image_size": int(config.data.get("image_size", 0) or 0),
               "random_flip": bool(config.data.get("random_flip", False))},
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


class _WithFeatures:
  """An image source whose element i also carries record i of a feature dataset."""

  def __init__(self, source, features: FeatureRecords):
    if len(features) != len(source):
      raise ValueError(f"data.vf_features {features.directory}: {len(features)} records for "
                       f"{len(source)} images; the features must be extracted from the same "
                       "image source, one record per image in source order (an image the "
                       "extraction skipped shifts every later record)")
    self.source, self.features = source, features

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return dict(self.source[index], vf_features=self.features[index]["features"])


class _CropWithFeatures:
  """``CenterCropTransform`` that keeps the element's ``vf_features``."""

  def __init__(self, image_size: int):
    self.crop = images_lib.CenterCropTransform(image_size)

  def __call__(self, element):
    out = self.crop(element)
    return None if out is None else dict(out, vf_features=element["vf_features"])


def _source_and_transform(kind: str, config, path_key: str = "path"):
  """(random-access source, per-element transform or None) for ``config.data``."""
  data_cfg = config.data
  if kind == "semvae":
    if not data_cfg.get(path_key):
      raise errors.ConfigError(f"config.data.{path_key} is empty: point it at a feature "
                               "dataset written by --mode=extract")
    recs = FeatureRecords(data_cfg[path_key])
    if recs.spec.dim != config.model.input_dim:
      raise errors.DataError(f"{recs.directory}: features of width {recs.spec.dim}, but "
                             f"config.model.input_dim is {config.model.input_dim}; set "
                             f"--config.model.input_dim={recs.spec.dim}")
    try:
      semantic_vae.token_grid(recs.spec.num_tokens)  # the posterior needs a square grid
    except ValueError as e:
      raise errors.DataError(f"{recs.directory}: {e}") from e
    return recs, None
  section = dict(data_cfg.to_dict(), path=data_cfg.get(path_key))
  if path_key == "eval_path":  # evaluation images always come from a folder
    section["source"] = "folder"
  source = images_lib.make_source(section)
  loss = config.get("loss") or {}
  if (path_key == "path" and texture_gan.uses_gan_objective(loss) and loss.get("use_vf")
      and loss.get("vf_source") == "features"):
    if not data_cfg.get("vf_features"):
      raise ValueError("config.loss.vf_source='features' needs config.data.vf_features (a "
                       "feature dataset of --mode=extract with extract.recipe=vf)")
    return (_WithFeatures(source, FeatureRecords(data_cfg.vf_features)),
            _CropWithFeatures(int(data_cfg.image_size)))
  return source, images_lib.CenterCropTransform(int(data_cfg.image_size))


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
    raise errors.DataError(f"config.data.eval_path {config.data.eval_path}: no readable "
                           "example")
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


def train_model(config: ml_collections.ConfigDict, workdir: str, model_kind: str, *,
                writer=None, devices=None) -> dict[str, Any]:
  """Trains (or resumes) ``model_kind`` ("semvae" | "texture_vae") in ``workdir``.

  Args:
    config: run config (``configs/semvae_ch16.py``, ``configs/texture_vae_f16d32.py``).
    workdir: checkpoints (``<workdir>/checkpoints``) and logs.
    model_kind: which autoencoder.
    writer: a metric writer (``write_scalars``, ``write_hparams``, ``flush``); default:
      the core's TensorBoard writer plus a progress hook.
    devices: devices of the mesh (default: all).

  Returns:
    ``{"step", "metrics" (last logged), "state"}``.
  """
  validate_config(config, model_kind)
  setup = build_setup(config, model_kind, devices)
  hooks = []
  if config.data.get("eval_path") and int(config.eval.get("every_steps", 0)):
    every, total = int(config.eval.every_steps), int(config.num_train_steps)

    def run_eval(step, state, w):
      out = evaluate(setup, config, state["params"])
      w.write_scalars(step, out)
      return out
    hooks.append(loop.PeriodicHook(due=lambda s: s % every == 0 or s == total, fn=run_eval))
  def init():
    logging.info("%s: initialising from converted checkpoint %s", model_kind,
                 config.init_from)
    return load_init_params(setup, config.init_from)
  task = loop.TrainTask(name=model_kind, setup=setup.core, step=setup.step,
                        make_data=lambda: make_train_iterator(config, model_kind),
                        init_params=init if config.get("init_from") else None, hooks=hooks, rate_name="examples_per_sec")
  return loop.train(task, config, workdir, writer=writer)


# ---------------------------------------------------------------------- export


def export_converted(config: ml_collections.ConfigDict, workdir: str, model_kind: str,
                     dst: str, step: int | None = None, force: bool = False,
                     devices=None, weights: str = "params") -> str:
  """Writes the parameters of a training checkpoint as a converted-weights folder.

  The folder has the layout of the converters' output (``common.save_params`` +
  ``meta.json`` with the model config), so ``--mode=encode`` reads it like converted
  reference weights (``config.encode.semvae`` / ``.texture_vae``). ``devices``: those of
  the training mesh when it did not use all devices. ``weights``: "params" or "ema"
  (runs with ``ema_decay`` > 0). Only the autoencoder is exported: a GAN run's
  discriminator and the VF projection are training-only.
  """
  validate_config(config, model_kind)
  if weights not in ("params", "ema"):
    raise ValueError(f"export weights {weights!r}: expected 'params' or 'ema'")
  setup = build_setup(config, model_kind, devices)
  if weights not in setup.abstract_state:
    raise ValueError(f"{workdir}: the run keeps no {weights!r} weights (ema_decay is 0)")
  state, step, _ = checkpoint.restore_state_only(os.path.join(workdir, "checkpoints"),
                                               setup.abstract_state, step)
  params = trees.to_numpy(jax.device_get(state[weights]))
  if model_kind == "texture_vae":
    params = texture_gan.autoencoder_params(params)
  source = f"{os.path.abspath(workdir)} step {step}"
  if model_kind == "texture_vae":
    return tvae_convert.save_converted(dst, params, setup.model_cfg, source=source,
                                       force=force)
  meta = {"model": "semantic_vae", "config": dataclasses.asdict(setup.model_cfg),
          "source": source}
  return common.save_params(dst, params, meta=meta, force=force)


def main(argv) -> None:
  """``python -m sfd_jax.training.vae --config=... --workdir=... --kind=... --dst=...``."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  out = export_converted(f.config, f.workdir, f.kind, f.dst, f.step if f.step >= 0 else None,
                         f.force, weights=f.weights)
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
  flags.DEFINE_enum("weights", "params", ["params", "ema"], "weight set to export")
  flags.mark_flags_as_required(["config", "workdir", "dst"])
  from sfd_jax.core import errors  # pylint: disable=g-import-not-at-top
  errors.run_main(main)   # user errors: one line, exit 2
