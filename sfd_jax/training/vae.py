"""The trainer of the small networks on the training core (``model_kind``): the Semantic
VAE, the texture VAE and the demo's feature net (docs/encode.md, docs/texture_vae.md).

  python main.py --mode=train_semvae --config=configs/semvae_ch16.py --workdir=runs/semvae
  python main.py --mode=train_texture_vae --config=configs/texture_vae_f16d32.py --workdir=runs/tvae

Like the DiT trainer: ``training.state`` builds the sharded state (``params``,
``opt_state``, ``nonfinite``, optional ``ema``; a GAN run adds ``disc_*``),
``training.step`` the donated step with randomness ``fold_in(key(seed), step)``,
``training.loop`` resumes exactly, logs, evaluates and checkpoints; the data is
``data.vae_pipeline``. Models and losses (``training.vae_losses``):

* ``"semvae"`` — ``SemanticVAE`` on pre-extracted DINOv2 patch features, ``semvae_loss``
  (MSE + token-axis cosine + 1e-7·KL; the reference recipe is configs/semvae_ch16.py);
* ``"texture_vae"`` — ``TextureVAE`` on images with the ADM centre crop;
  ``config.loss.name``: ``"l1_kl"`` (``texture_vae_loss``; ``register_generator_term``
  adds generator-loss terms listed in ``config.loss.extra_terms``) or ``"ldm"`` (the LDM /
  VA-VAE GAN recipe: ``training.texture_gan``);
* ``"feature_net"`` — the demo's ``DemoFeatureNet`` classifier on labelled images:
  cross-entropy on ImageNet-normalised crops shifted by up to ``config.loss.max_shift``
  pixels (one random shift per batch).

Evaluation (``config.data.eval_path``, every ``config.eval.every_steps``) with the
posterior mean: SemVAE MSE and cosines, texture VAE L1 and PSNR, feature-net accuracy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.convert import common
from sfd_jax.convert.networks import NETWORKS, TRAINABLE
from sfd_jax.core import checks, errors, options
from sfd_jax.data import global_batch, preprocess, vae_pipeline
from sfd_jax.training import loop, optim, texture_gan, vae_losses
from sfd_jax.training import state as state_lib
from sfd_jax.training import step as step_lib

KINDS = TRAINABLE


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
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  fields = {k: v for k, v in config.model.to_dict().items()
            if k not in ("dtype", "param_dtype")}
  try:
    cfg = NETWORKS[kind][0](**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in fields.items()})
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.model does not describe a {kind}: {e}") from e
  if kind == "texture_vae" and cfg.dropout > 0:
    raise errors.ConfigError("config.model.dropout > 0 is not supported by the VAE "
                             "trainer (0 in every released model); set it to 0")
  return cfg


EXAMPLES = {"semvae": "configs/semvae_ch16.py", "texture_vae": "configs/texture_vae_f16d32.py",
            "feature_net": "configs/demo.py (demo.feature_net)"}


def validate_config(config: ml_collections.ConfigDict, kind: str, devices=None) -> None:
  """A training config of ``kind``, before anything is built: a config of that kind,
  every field against its declaration (``core.options``), the model it describes, the
  batch against the mesh, and the GAN recipe's checks across fields."""
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  checks.require_sections(config, ("model", "loss", "optimizer", "data", "mesh"),
                          mode=f"train_{kind}", example=EXAMPLES[kind])
  found = options.family_of(config)
  if found != kind:
    raise errors.ConfigError(
        f"the config is {options.TITLES[found]}, but --mode=train_{kind} trains a {kind} "
        f"from {options.TITLES[kind]}; use one written for it (e.g. {EXAMPLES[kind]})")
  options.check(config, kind)
  model_cfg = model_config(config, kind)
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(int(config.batch_size), mesh)
  if kind == "texture_vae":
    _extra_terms(config.loss)
    if texture_gan.uses_gan_objective(config.loss):
      texture_gan.check_config(config, model_cfg)


def _build_model(kind: str, cfg, model_section, seed: int) -> nnx.Module:
  return NETWORKS[kind][1](
      cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(model_section.get("dtype", "float32")),
      param_dtype=jnp.dtype(model_section.get("param_dtype", "float32")))


def _imagenet_input(images_u8: jax.Array) -> jax.Array:
  return preprocess.imagenet_normalize(jnp.asarray(images_u8, jnp.float32) / 255.0)


def _train_loss(kind: str, loss_cfg, model, batch, key):
  """(loss, metrics) of one global batch."""
  if kind == "semvae":
    feats = batch["features"].astype(jnp.float32)
    recon, _, kl = model(feats, key)
    loss, terms = vae_losses.semvae_loss(
        recon, feats, kl, mse_weight=loss_cfg.mse_weight, l1_weight=loss_cfg.l1_weight,
        cos_weight=loss_cfg.cos_weight, kl_weight=loss_cfg.kl_weight,
        cos_axis=loss_cfg.cos_axis)
    terms = dict(terms)
    terms["loss"] = terms.pop("total")
    return loss, terms
  if kind == "feature_net":
    s = int(loss_cfg.get("max_shift", 1))
    shift = jax.random.randint(key, (2,), -s, s + 1)
    x = jnp.roll(_imagenet_input(batch["image"]), (shift[0], shift[1]), axis=(1, 2))
    logits = model.logits(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"loss": loss,
                  "accuracy": jnp.mean((logits.argmax(-1) == batch["label"]).astype(jnp.float32))}
  images = preprocess.uint8_to_m11(batch["image"])
  return vae_losses.texture_vae_loss(model, images, key, kl_weight=loss_cfg.kl_weight,
                                     pixel_reduction=loss_cfg.pixel_reduction,
                                     extra_terms=_extra_terms(loss_cfg))


def _eval_metrics(kind: str, model, batch) -> dict[str, jax.Array]:
  """Per-example metrics ([B] arrays): reconstructions with the posterior mean, or the
  feature net's classification."""
  if kind == "semvae":
    feats = batch["features"].astype(jnp.float32)
    recon = model.decode(model.encode(feats).mode()).astype(jnp.float32)
    cos = vae_losses.cosine_similarity
    return {"mse": jnp.mean(jnp.square(recon - feats), axis=(1, 2)),
            "cos_sim": jnp.mean(cos(recon, feats, axis=-1), axis=1),
            "cos_sim_token_axis": jnp.mean(cos(recon, feats, axis=1), axis=1)}
  if kind == "feature_net":
    logits = model.logits(_imagenet_input(batch["image"]))
    return {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32)}
  x = preprocess.uint8_to_m11(batch["image"])
  recon = model.decode(model.encode(x).mode()).astype(jnp.float32)
  mse = jnp.mean(jnp.square(recon - x), axis=(1, 2, 3))
  return {"l1": jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3)),
          # pixel range [-1, 1]: peak-to-peak 2
          "psnr": 20.0 * jnp.log10(2.0) - 10.0 * jnp.log10(jnp.maximum(mse, 1e-12))}


# ------------------------------------------------------------------ the setup


@dataclasses.dataclass(frozen=True, eq=False)
class VAESetup:
  """A run on the training core: the core's setup, the jitted step and the evaluation."""
  kind: str
  core: state_lib.TrainSetup
  step: Callable            # step(state, batch) -> (state, metrics)
  evaluate: Callable        # evaluate(params, batch, mask) -> (masked metric sums, count)


def build_setup(config: ml_collections.ConfigDict, kind: str, devices=None,
                frozen_nets=None) -> VAESetup:
  """Mesh, optimizer, shardings and jitted functions for ``config`` (validated). A test
  that trains several times with one config builds it once and passes it to
  ``train_model``, which then reuses the compiled step. ``frozen_nets``: the GAN recipe's
  frozen networks to use instead of loading them (``texture_gan.build``)."""
  if kind not in KINDS:
    raise ValueError(f"model kind {kind!r} not one of {KINDS}")
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(int(config.batch_size), mesh)
  model_cfg = model_config(config, kind)
  seed = int(config.seed)
  options = config.get("compiler_options")
  options = options.to_dict() if options else None
  if kind == "texture_vae" and texture_gan.uses_gan_objective(config.loss):
    gan = texture_gan.build(config, mesh, model_cfg, compiler_options=options,
                            frozen_nets=frozen_nets)
    core, step = gan.core, gan.step
  else:
    tx, schedule = optim.make_optimizer(config.optimizer)
    ema = float(config.get("ema_decay", 0.0) or 0.0)
    core = state_lib.build_setup(
        [state_lib.Part(build=lambda: _build_model(kind, model_cfg, config.model, seed),
                        tx=tx, schedule=schedule, ema_key="ema" if ema > 0 else None)],
        mesh, rules=config.get("sharding_rules") or parallel.DEFAULT_RULES, seed=seed,
        strict_sharding=bool(config.get("strict_sharding", False)), model_cfg=model_cfg,
        ema_decay=ema if ema > 0 else None, compiler_options=options)
    loss_cfg = config.loss
    step = step_lib.make_train_step(
        core, lambda model, batch, key, _: _train_loss(kind, loss_cfg, model, batch, key))

  def eval_fn(params, batch, mask):
    per_example = _eval_metrics(kind, core.model(params), batch)
    return {k: jnp.sum(v * mask) for k, v in per_example.items()}, jnp.sum(mask)

  batch_sh = parallel.batch_sharding(mesh)
  evaluate_fn = core.jit(eval_fn, in_shardings=(core.state_shardings["params"], batch_sh,
                                                batch_sh),
                         out_shardings=parallel.replicated(mesh))
  for note in core.sharding_notes:
    logging.info("sharding: %s", note)
  return VAESetup(kind, core, step, evaluate_fn)


def load_init_params(setup: VAESetup, directory: str) -> dict:
  """Pure-dict params from a converted checkpoint folder (``sfd_jax.convert.*``),
  checked against the model (path and shape of every parameter)."""
  params, _ = common.load_params(directory)
  core = setup.core
  model = nnx.clone(core.model(nnx.to_pure_dict(core.abstract_params)))
  common.assign(model, params, name=directory)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def evaluate(setup: VAESetup, config, params) -> dict[str, float]:
  """Mean per-example metrics over the evaluation set (``config.data.eval_path``)."""
  sums: dict[str, float] = {}
  count = 0.0
  spec = P(parallel.BATCH_AXES)
  mesh = setup.core.mesh
  for batch, mask in vae_pipeline.eval_batches(config, setup.kind):
    out, n = setup.evaluate(params, global_batch.to_global(batch, mesh, spec),
                            global_batch.to_global(mask.astype(np.float32), mesh, spec))
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    count += float(n)
  return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()}


# ------------------------------------------------------------------------ loop


def train_model(config: ml_collections.ConfigDict, workdir: str, model_kind: str, *,
                writer=None, devices=None, setup: VAESetup | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``model_kind`` (one of ``KINDS``) in ``workdir``.

  ``writer``: a metric writer (``write_scalars``, ``write_hparams``, ``flush``); default:
  the core's TensorBoard writer plus a progress hook. ``devices``: those of the mesh
  (default: all). ``setup``: ``build_setup(config, model_kind, devices)`` built earlier.
  Returns ``{"step", "metrics" (last logged), "state"}``.
  """
  if setup is not None and devices is None:     # the mesh the given setup was built on
    devices = list(setup.core.mesh.devices.flat)
  validate_config(config, model_kind, devices)
  setup = setup or build_setup(config, model_kind, devices)
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
                        make_data=lambda: vae_pipeline.make_train_iterator(config, model_kind),
                        init_params=init if config.get("init_from") else None, hooks=hooks,
                        rate_name="examples_per_sec")
  return loop.train(task, config, workdir, writer=writer)
