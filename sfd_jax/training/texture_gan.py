"""The texture VAE's LDM / VA-VAE recipe on the training core: two parts, one step
(docs/texture_vae.md, "The step on the training core").

``config.loss.name = "ldm"`` selects it in ``--mode=train_texture_vae``
(``sfd_jax.training.vae``); the default ``"l1_kl"`` keeps the L1 + KL trainer. The parts,
updated in this order on the same global batch as the reference's manual optimisation:
the autoencoder (``params``, ``opt_state``, optional ``ema``; a ``ProjectedTextureVAE``
with the VF loss) with ``gan_losses.generator_loss``, then the PatchGAN discriminator
(``disc_params``, ``disc_opt_state``, ``disc_stats``: its BatchNorm statistics) with
``gan_losses.discriminator_loss`` on the real batch and the generator call's
reconstructions (handed on through the step's ``carry``). ``loss.step_counter =
"reference"`` counts batch b as step 2b for the generator and 2b + 1 for the
discriminator. Frozen networks (LPIPS; DINOv2 ViT-L/14 for ``loss.vf_source = "dinov2"``)
are placed by ``training.state.freeze`` and passed to the jitted step, never
checkpointed; ``vf_source = "features"`` reads pre-extracted features from the batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from sfd_jax import parallel
from sfd_jax.convert import common as convert_common
from sfd_jax.convert import lpips as lpips_convert
from sfd_jax.convert import networks
from sfd_jax.core.errors import ConfigError
from sfd_jax.data import preprocess
from sfd_jax.training import gan_losses
from sfd_jax.models import discriminator as disc_lib
from sfd_jax.models import texture_vae
from sfd_jax.training import optim
from sfd_jax.training import state as state_lib
from sfd_jax.training import step as step_lib

OBJECTIVES = ("l1_kl", "ldm")
VF_SOURCES = ("dinov2", "features")
DEC_LAST = ("decoder", "conv_out", "kernel")
ENC_LAST = ("encoder", "conv_out", "kernel")
PATCH = 14  # DINOv2 patch size


LPIPS_EMPTY = ("config.loss.lpips is empty: the GAN recipe (config.loss.name='ldm') with "
               "config.loss.perceptual_weight > 0 needs the LPIPS network; convert its "
               "weights once (python -m sfd_jax.convert.lpips --vgg vgg16-397923af.pth --lin "
               "vgg.pth --dst DIR) and point the field at DIR, or set "
               "loss.perceptual_weight=0 (or loss.lpips_random_init=True in tests)")


def check_config(cfg: ml_collections.ConfigDict, model_cfg) -> None:
  """The GAN recipe's checks across fields, before anything is built (``ConfigError``):
  the LPIPS network when LPIPS is on, the VF settings, the PatchGAN against the image
  size, the pre-extracted VF features when they are the source."""
  gcfg = loss_config(cfg.loss)
  loss = cfg.loss
  if gcfg.use_lpips and not loss.get("lpips_random_init", False):
    if not loss.get("lpips"):
      raise ConfigError(LPIPS_EMPTY)
    if os.path.isdir(loss.lpips):      # a folder of another network is named as such
      convert_common.check_converted_dir(loss.lpips, lpips_convert.KIND, "config.loss.lpips")
  vf = vf_settings(cfg, model_cfg)
  if vf is not None and vf.source == "features" and not cfg.data.get("vf_features"):
    raise ConfigError("config.loss.vf_source='features' needs config.data.vf_features (a "
                      "feature dataset of --mode=extract with extract.recipe=vf)")
  size = int(cfg.data.image_size)
  if gcfg.use_gan and disc_config(loss).output_size(size) < 1:
    raise ConfigError(f"config.data.image_size={size}: images of {size} pixels are too "
                      f"small for the {disc_config(loss).n_layers}-layer PatchGAN "
                      "(config.loss.disc_num_layers; 3 layers need at least 24)")


def objective_name(loss_cfg) -> str:
  name = str(loss_cfg.get("name", "l1_kl") or "l1_kl")
  if name not in OBJECTIVES:
    raise ConfigError(f"config.loss.name must be one of {OBJECTIVES}, got {name!r}")
  return name


def uses_gan_objective(loss_cfg) -> bool:
  return objective_name(loss_cfg) == "ldm"


def loss_config(loss_cfg) -> gan_losses.GANLossConfig:
  """``GANLossConfig`` from ``config.loss`` (its field names; other fields ignored)."""
  return gan_losses.GANLossConfig.from_dict(loss_cfg.to_dict())


def disc_config(loss_cfg) -> disc_lib.DiscriminatorConfig:
  return disc_lib.DiscriminatorConfig(in_channels=3, ndf=int(loss_cfg.get("disc_ndf", 64)),
                                      n_layers=int(loss_cfg.get("disc_num_layers", 3)))


@dataclasses.dataclass(frozen=True)
class VFSettings:
  source: str
  dim: int
  image_size: int       # foundation-model input side (DINOv2: 14 × the latent grid)
  grid: int             # latent grid side


def vf_settings(cfg: ml_collections.ConfigDict, model_cfg) -> VFSettings | None:
  loss = cfg.loss
  if not loss.get("use_vf", False):
    return None
  source = str(loss.get("vf_source", "dinov2"))
  if source not in VF_SOURCES:
    raise ConfigError(f"config.loss.vf_source must be one of {VF_SOURCES}, got {source!r}")
  image_size = int(cfg.data.image_size)
  if image_size % model_cfg.downsample_factor:
    raise ConfigError(f"config.data.image_size {image_size} is not a multiple of the "
                     f"autoencoder's downsampling factor {model_cfg.downsample_factor}")
  grid = image_size // model_cfg.downsample_factor
  size = int(loss.get("vf_image_size", 0) or PATCH * grid)
  if source == "dinov2" and size != PATCH * grid:
    raise ConfigError(f"config.loss.vf_image_size {size}: DINOv2's {size // PATCH}×"
                     f"{size // PATCH} patch grid must equal the {grid}×{grid} latent grid "
                     f"(use {PATCH * grid}); the reference uses 224 for 256-pixel images")
  if source == "features" and cfg.data.get("random_flip", False):
    raise ConfigError("config.loss.vf_source='features' with data.random_flip: the stored "
                     "features are those of the unflipped images")
  return VFSettings(source, int(loss.get("vf_dim", 1024)), size, grid)


def _build_autoencoder(model_cfg, model_section, seed: int, vf: VFSettings | None):
  kw = dict(rngs=nnx.Rngs(seed), dtype=jnp.dtype(model_section.get("dtype", "float32")),
            param_dtype=jnp.dtype(model_section.get("param_dtype", "float32")))
  if vf is None:
    return texture_vae.TextureVAE(model_cfg, **kw)
  return texture_vae.ProjectedTextureVAE(model_cfg, vf.dim, **kw)


def frozen_networks(cfg: ml_collections.ConfigDict, gcfg: gan_losses.GANLossConfig,
                    vf: VFSettings | None) -> dict[str, nnx.Module]:
  """The frozen networks of the run (LPIPS, DINOv2), loaded or randomly initialised."""
  loss = cfg.loss
  nets = {}
  if gcfg.use_lpips:
    if loss.get("lpips_random_init", False):
      nets["lpips"] = lpips_convert.random_lpips(
          int(cfg.seed), width=float(loss.get("lpips_random_width", 1.0)))
    elif not loss.get("lpips"):
      raise ConfigError(LPIPS_EMPTY)
    else:
      nets["lpips"] = lpips_convert.load_lpips(loss.lpips)
  if vf is not None and vf.source == "dinov2":
    dino = networks.load_network(
        "dinov2", loss.get("vf_dinov2", ""), random_init=bool(loss.get("vf_random_init", False)),
        preset=str(loss.get("vf_dinov2_preset", "vitl14")), dtype="float32", seed=int(cfg.seed),
        field="config.loss.vf_dinov2")
    if dino.config.embed_dim != vf.dim:
      raise ConfigError(f"config.loss.vf_dim {vf.dim} differs from the width "
                        f"{dino.config.embed_dim} of the DINOv2 in config.loss.vf_dinov2; "
                        f"set --config.loss.vf_dim={dino.config.embed_dim}")
    nets["dinov2"] = dino
  return nets


def _aux_features(vf: VFSettings, batch, ctx, images: jax.Array) -> jax.Array:
  """Foundation-model features [B, h, w, C] of the batch (no gradient)."""
  if vf.source == "features":
    if "vf_features" not in batch:
      raise ConfigError("config.loss.vf_source='features' but the batch has no "
                        "'vf_features' (set config.data.vf_features)")
    feats = batch["vf_features"].astype(jnp.float32)
  else:
    x = preprocess.vf_foundation_input(images, vf.image_size)
    feats = ctx["frozen"]["dinov2"].patch_features(x).astype(jnp.float32)
  b, t, c = feats.shape
  if t != vf.grid * vf.grid or c != vf.dim:
    raise ConfigError(f"VF features of shape {tuple(feats.shape)[1:]} do not match the "
                      f"{vf.grid}×{vf.grid} latent grid and config.loss.vf_dim {vf.dim}")
  return jax.lax.stop_gradient(feats.reshape(b, vf.grid, vf.grid, c))


def make_losses(setup: state_lib.TrainSetup, gcfg: gan_losses.GANLossConfig,
                vf: VFSettings | None) -> dict[str, Callable]:
  """``{params_key: loss_fn}`` of the generator (and discriminator) for the core's step."""
  ae_ps = setup.parts[0]
  disc_ps = setup.parts[1] if gcfg.use_gan else None

  def discriminate(ctx):
    def run(x):
      disc = disc_ps.model(ctx["disc_params"], ctx["disc_stats"])
      logits = disc(x)
      return logits, nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))
    return run

  @step_lib.OwnGradients
  def generator(model, batch, key, ctx):
    images = preprocess.uint8_to_m11(batch["image"])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def forward(p):
      m = ae_ps.model(p)
      posterior = m.encode(images)
      z = posterior.sample(key)
      out = {"recon": m.decode(z), "posterior": posterior}
      if vf is not None:
        out["z_vf"] = m.linear_proj(z)
      return out

    loss, logs, extras = gan_losses.generator_loss(
        forward, params, images, cfg=gcfg, global_step=gcfg.reference_step(ctx["step"], 0),
        dec_last=DEC_LAST, enc_last=ENC_LAST,
        perceptual=ctx["frozen"].get("lpips") if gcfg.use_lpips else None,
        discriminate=discriminate(ctx) if gcfg.use_gan else None,
        aux_feature=_aux_features(vf, batch, ctx, images) if vf is not None else None,
        param_grads=True)
    metrics = dict(logs, loss=loss,
                   posterior_std_mean=jnp.mean(extras["posterior"].std))
    if "p_loss" in extras:
      metrics["p_loss"] = jnp.mean(extras["p_loss"])
    out = {"grads": extras["param_grads"]}
    if gcfg.use_gan:
      out.update(state={disc_ps.part.stats_key: extras["disc_stats"]},
                 carry={"recon": jax.lax.stop_gradient(extras["recon"])})
    return loss, metrics, out

  losses = {ae_ps.part.params_key: generator}
  if gcfg.use_gan:
    def discriminator(model, batch, key, ctx):
      del key
      images = preprocess.uint8_to_m11(batch["image"])
      logits_real = model(images)
      logits_fake = model(ctx["carry"]["recon"])
      d_loss, logs = gan_losses.discriminator_loss(
          logits_real, logits_fake, cfg=gcfg, global_step=gcfg.reference_step(ctx["step"], 1))
      return d_loss, dict(logs, loss=d_loss)
    losses[disc_ps.part.params_key] = discriminator
  return losses


@dataclasses.dataclass(frozen=True, eq=False)
class GANTrainer:
  """The core's setup, the jitted step and what the trainer needs to know about it."""
  core: state_lib.TrainSetup
  step: Callable
  loss_cfg: gan_losses.GANLossConfig
  vf: VFSettings | None


def build(cfg: ml_collections.ConfigDict, mesh: Mesh, model_cfg,
          compiler_options=None, frozen_nets: dict[str, nnx.Module] | None = None
          ) -> GANTrainer:
  """Parts, shardings, frozen networks and the jitted two-optimizer step of ``cfg``.

  ``frozen_nets``: the frozen networks to use instead of those of ``frozen_networks``
  (e.g. ``nnx.eval_shape`` instances to compile the step without weights).
  """
  seed = int(cfg.seed)
  gcfg = loss_config(cfg.loss)
  vf = vf_settings(cfg, model_cfg)
  check_config(cfg, model_cfg)
  tx, schedule = optim.make_optimizer(cfg.optimizer)
  ema = float(cfg.get("ema_decay", 0.0) or 0.0)
  parts = [state_lib.Part(build=lambda: _build_autoencoder(model_cfg, cfg.model, seed, vf),
                          tx=tx, schedule=schedule, ema_key="ema" if ema > 0 else None,
                          metrics_prefix="ae")]
  if gcfg.use_gan:
    d_tx, d_schedule = optim.make_optimizer(cfg.get("disc_optimizer") or cfg.optimizer)
    dcfg = disc_config(cfg.loss)
    parts.append(state_lib.Part(
        build=lambda: disc_lib.NLayerDiscriminator(dcfg, rngs=nnx.Rngs(seed + 1)),
        tx=d_tx, schedule=d_schedule, params_key="disc_params", opt_key="disc_opt_state",
        stats_key="disc_stats", metrics_prefix="disc"))
  core = state_lib.build_setup(
      parts, mesh, rules=cfg.get("sharding_rules") or parallel.DEFAULT_RULES, seed=seed,
      strict_sharding=bool(cfg.get("strict_sharding", False)), model_cfg=model_cfg,
      obj_cfg=gcfg, ema_decay=ema if ema > 0 else None, compiler_options=compiler_options)
  nets = frozen_networks(cfg, gcfg, vf) if frozen_nets is None else frozen_nets
  frozen = state_lib.freeze(core, nets)
  step = step_lib.make_train_step(core, make_losses(core, gcfg, vf), frozen=frozen)
  return GANTrainer(core, step, gcfg, vf)


def autoencoder_params(params: dict) -> dict:
  """The ``TextureVAE`` parameters of the autoencoder part (``linear_proj`` dropped)."""
  return {k: v for k, v in params.items() if k != "linear_proj"}

