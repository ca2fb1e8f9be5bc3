"""The programs a config runs, built with abstract inputs on a given set of devices.

Each builder returns ``Program``s whose ``lower(global_batch)`` traces and lowers the
same jitted function the job itself runs (same builders, shardings and options), with
``ShapeDtypeStruct`` arguments: nothing is allocated, no data or weights are read.

* SFD configs (``config.objective``): the DiT train step (``training.sfd``: the config's
  optimizer, EMA, loss, step options), one program per remat policy asked for; the
  sampling program (``diffusion.generation.generate`` under the sampling job's jit: the
  configured solver and guidance; the autoguidance guide has the architecture of
  ``config.plan.guide_variant``; decoding when ``config.sample.texture_vae`` is set);
* VAE configs (``config.loss``): the Semantic VAE or texture VAE step
  (``training.vae``; the GAN recipe's step with its frozen LPIPS / DINOv2 built without
  weights);
* encode configs (``config.encode``): the encode program (``data.encode.encode_batch``) on
  the chips of one host, as the job runs per process.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel, sampling
from sfd_jax.core import jit as jit_lib
from sfd_jax.diffusion import generation
from sfd_jax.models import attention as attn_lib
from sfd_jax.models.lightning_dit import REMAT_POLICIES, DiTConfig, LightningDiT
from sfd_jax.planning import flops as flops_lib
from sfd_jax.planning.tpu import PlanError

KINDS = ("sfd", "semvae", "texture_vae", "encode")


@dataclasses.dataclass
class Program:
  """One compiled program of a plan.

  ``lower(b)`` lowers it at global batch ``b`` (a multiple of ``batch_unit``);
  ``analytic(b)`` is the analytic matmul FLOP count of one call (None: no model of it);
  ``leading(b)``: array shapes that would mean a chip holds the whole global batch.
  """
  name: str
  title: str
  batch: int
  batch_field: str
  batch_unit: int
  lower: Callable[[int], Any]
  analytic: Callable[[int], float] | None = None
  analytic_note: str = ""
  leading: Callable[[int], list[tuple[int, ...]]] | None = None
  searchable: bool = False
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)   # config fields it reads


def config_kind(config) -> str:
  """Which job family a config belongs to (see the module doc)."""
  if config.get("encode") is not None and config.get("extract") is not None:
    return "encode"
  if config.get("objective") is not None and config.get("model") is not None:
    return "sfd"
  if config.get("loss") is not None and config.get("model") is not None:
    return "semvae" if "bottleneck_dim" in config.model else "texture_vae"
  raise PlanError("the config is none of an SFD training config (config.objective), a VAE "
                  "training config (config.loss) or an encode config (config.encode); "
                  "--mode=plan compiles the programs of those")


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def _sharded(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      tree)


def _mesh(config, devices, field: str = "config.mesh"):
  shape = config.mesh.to_dict()
  try:
    return parallel.make_mesh(shape, devices)
  except parallel.ShardingError as e:
    raise PlanError(f"{field}={shape} does not fit the {len(devices)} chips of the "
                    f"topology: {e}; set {field}.* so that data×fsdp×tensor = "
                    f"{len(devices)} (one axis may be -1)") from e


def hosts(devices) -> int:
  """Processes (TPU VM hosts) the devices belong to."""
  return len({d.process_index for d in devices})


# ------------------------------------------------------------------ SFD: train step


def dit_train_batch(setup, global_batch: int, repa_dtype: str, with_repa: bool):
  """ShapeDtypeStructs of one training batch (the pipeline's keys, dtypes, sharding)."""
  cfg = setup.model_cfg
  sh = parallel.batch_sharding(setup.mesh)
  g = cfg.input_size
  out = {"latent": jax.ShapeDtypeStruct((global_batch, g, g, cfg.in_channels), jnp.float32,
                                        sharding=sh),
         "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sh)}
  if with_repa:
    out["repa"] = jax.ShapeDtypeStruct((global_batch, cfg.num_tokens, cfg.repa_dim),
                                       jnp.dtype(repa_dtype), sharding=sh)
  return out


def attention_choice(model_cfg: DiTConfig, device) -> str:
  """What ``attention_impl`` resolves to for this model on ``device`` inside a mesh."""
  return attn_lib.select_impl(model_cfg.attention_impl, head_dim=model_cfg.head_dim,
                              dtype=jnp.dtype(model_cfg.dtype), device=device,
                              seq_len=model_cfg.num_tokens, mesh_known=True)


def dit_train_programs(config, devices, remats: list[str],
                       attention: str | None = None) -> list[Program]:
  """One train-step program per remat policy (``attention``: override the config's
  ``model.attention_impl``)."""
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  mesh = _mesh(config, devices)   # a plan error where config.mesh does not fit the chips
  sfd.validate_config(config, devices)
  unit = parallel.batch_devices(mesh)
  programs = []
  for remat in remats:
    if remat not in REMAT_POLICIES:
      raise PlanError(f"config.plan.remat_policies: {remat!r} is not one of "
                      f"{REMAT_POLICIES}")
    cfg = _copy(config)
    cfg.model.remat_policy = remat
    if attention is not None:
      cfg.model.attention_impl = attention
    model_cfg, _ = sfd.model_configs(cfg)
    setup = sfd.build(cfg, devices=devices)
    with_repa = bool(cfg.objective.use_repa and cfg.model.use_repa)
    repa_dtype = str(cfg.data.get("repa_dtype", "float32"))

    def lower(b, cfg=cfg, setup=setup, with_repa=with_repa, repa_dtype=repa_dtype):
      c = _copy(cfg)
      c.batch_size = int(b)
      parallel.check_batch(int(b), setup.mesh, process_count=hosts(devices))
      step = sfd.make_train_step(setup, **sfd.step_options(c))
      return step.lower(setup.abstract_state,
                        dit_train_batch(setup, int(b), repa_dtype, with_repa))

    fwd = flops_lib.forward_flops(model_cfg, repa=with_repa).train_step
    impl = attention_choice(model_cfg, devices[0])
    programs.append(Program(
        name="train", title=f"DiT train step ({config.model.variant}, remat {remat}, "
        f"attention {impl})", batch=int(config.batch_size), batch_field="config.batch_size",
        batch_unit=unit, lower=lower, analytic=lambda b, f=fwd: f * b,
        analytic_note="3 × forward incl. REPA head (remat recomputation not counted)",
        leading=lambda b, t=model_cfg.num_tokens, u=unit: [(b, t)] if u > 1 else [],
        searchable=True,
        settings={"variant": config.model.variant, "remat": remat, "attention": impl,
                  "dtype": model_cfg.dtype, "scan_blocks": model_cfg.scan_blocks,
                  "mesh": dict(mesh.shape), "params": _param_count(setup)},
        fields={"config.model.remat_policy": remat}))
  return programs


def _param_count(setup) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_params)))


# ------------------------------------------------------------------ SFD: sampling


def _abstract_dit(cfg: DiTConfig):
  return nnx.split(nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0))))


def guide_config(main: DiTConfig, variant: str) -> DiTConfig:
  """The autoguidance guide: ``variant``'s size with the main model's latent layout,
  clocks and options."""
  try:
    sized = DiTConfig.variant(variant)
  except ValueError as e:
    raise PlanError(f"config.plan.guide_variant={variant!r}: {e}") from e
  return dataclasses.replace(main, depth=sized.depth, hidden_size=sized.hidden_size,
                             num_heads=sized.num_heads,
                             repa_depth=min(main.repa_depth, sized.depth))


def sample_program(config, devices, plan) -> Program:
  """The sampling job's program at ``config.sample.batch_size`` (see the module doc)."""
  from sfd_jax.models import texture_vae  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  s = config.sample
  opts = generation.SamplingOptions.from_config(s)
  sch = sampling.schedule_of(config)
  if sch is not None:
    opts = dataclasses.replace(opts, schedule=sch)
  model_cfg, _ = sfd.model_configs(config)
  model_cfg = dataclasses.replace(model_cfg, dtype=str(jnp.dtype(s.get("dtype", "float32")
                                                                 or "float32")))
  guided_ag = opts.guidance == "autoguidance" and opts.guided
  guide_cfg = guide_config(model_cfg, str(plan.guide_variant)) if guided_ag else None
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  batch_sh, rep = NamedSharding(mesh, P("data")), parallel.replicated(mesh)
  g_model, p_model = _abstract_dit(model_cfg)
  g_guide, p_guide = _abstract_dit(guide_cfg) if guide_cfg is not None else (None, None)
  decoder = None
  if s.get("texture_vae", ""):
    tcfg = texture_vae.TextureVAEConfig.preset(str(plan.decoder_preset))
    vae = nnx.eval_shape(lambda: texture_vae.TextureVAE(tcfg, rngs=nnx.Rngs(0)))
    tex = jax.ShapeDtypeStruct((tcfg.embed_dim,), jnp.float32)
    decoder = generation.LatentDecoder(vae, tex, tex,
                                       float(config.data.get("latent_multiplier", 1.0)))
  s_dec, p_dec = decoder.split() if decoder is not None else (None, None)

  def generate_batch(pm, pg, pd, indices, labels, key):
    gd = nnx.merge(g_guide, pg) if pg is not None else None
    dec = generation.LatentDecoder.merge(s_dec, pd) if pd is not None else None
    return generation.generate(nnx.merge(g_model, pm), gd, dec, indices, labels, key, opts)

  options = dict(jit_lib.inference_options(jit_lib.compiler_options(s), backend="tpu"))
  gen = jax.jit(generate_batch, out_shardings=(batch_sh, rep),
                compiler_options=options or None)
  key = jax.eval_shape(lambda: jax.random.key(0))

  def lower(b):
    b = int(b)
    if b % mesh.size:
      raise PlanError(f"config.sample.batch_size={b} is not divisible by the {mesh.size} "
                      f"chips (the sampling job splits the batch over all devices); use a "
                      f"multiple of {mesh.size}")
    args = (_sharded(p_model, rep), _sharded(p_guide, rep) if p_guide is not None else None,
            _sharded(p_dec, rep) if p_dec is not None else None,
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))
    with attn_lib.use_mesh(mesh):   # as the sampling job (sampling.sample_to_directory)
      return gen.lower(*args)

  per_eval = flops_lib.velocity_flops(model_cfg, opts.guidance, guide_cfg, opts.guided)
  guidance = f"{opts.guidance} {opts.scale:g}" if opts.guided else "none"
  return Program(
      name="sample", title=f"sampling ({opts.method}, {opts.num_steps} steps, guidance "
      f"{guidance}{', decode' if decoder is not None else ''})",
      batch=int(s.batch_size), batch_field="config.sample.batch_size", batch_unit=mesh.size,
      lower=lower, analytic=lambda b, f=per_eval: f * b,
      analytic_note="one velocity evaluation (the ratio counts evaluations in the program; "
      "loops of unknown length once)",
      settings={"method": opts.method, "num_steps": opts.num_steps, "guidance": guidance,
                "guide_variant": str(plan.guide_variant) if guided_ag else None,
                "decode": decoder is not None, "dtype": model_cfg.dtype,
                "attention": attention_choice(model_cfg, devices[0]),
                "mesh": dict(mesh.shape)})


# ------------------------------------------------------------------ VAEs


def _abstract_frozen_nets(config, model_cfg) -> dict[str, nnx.Module]:
  """The GAN recipe's frozen networks without weights (their architectures only)."""
  # pylint: disable=import-outside-toplevel
  from sfd_jax.models import dinov2
  from sfd_jax.models import lpips as lpips_lib
  from sfd_jax.training import texture_gan
  loss = config.loss
  gcfg = texture_gan.loss_config(loss)
  vf = texture_gan.vf_settings(config, model_cfg)
  nets = {}
  if gcfg.use_lpips:
    width = float(loss.get("lpips_random_width", 1.0)) if loss.get("lpips_random_init") \
        else 1.0
    nets["lpips"] = nnx.eval_shape(lambda: lpips_lib.LPIPS(width=width, rngs=nnx.Rngs(0)))
  if vf is not None and vf.source == "dinov2":
    dcfg = dinov2.DinoV2Config.preset(str(loss.get("vf_dinov2_preset", "vitl14")))
    nets["dinov2"] = nnx.eval_shape(
        lambda: dinov2.DinoV2(dcfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  return nets


def vae_program(config, devices, kind: str, plan) -> Program:
  """The SemVAE / texture VAE training step (the GAN recipe's two-part step)."""
  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import texture_gan, vae
  _mesh(config, devices)   # a plan error where config.mesh does not fit the chips
  vae.validate_config(config, kind, devices)
  model_cfg = vae.model_config(config, kind)
  gan = kind == "texture_vae" and texture_gan.uses_gan_objective(config.loss)
  nets = _abstract_frozen_nets(config, model_cfg) if gan else None
  setup = vae.build_setup(config, kind, devices, frozen_nets=nets)
  sh = parallel.batch_sharding(setup.core.mesh)
  vf_features = None
  if gan and config.loss.get("use_vf") and config.loss.get("vf_source") == "features":
    vf = texture_gan.vf_settings(config, model_cfg)
    vf_features = (vf.grid * vf.grid, vf.dim)

  def batch(b):
    if kind == "semvae":
      return {"features": jax.ShapeDtypeStruct(
          (b, int(plan.feature_tokens), int(config.model.input_dim)), jnp.float16,
          sharding=sh)}
    size = int(config.data.image_size)
    out = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=sh)}
    if vf_features is not None:
      out["vf_features"] = jax.ShapeDtypeStruct((b,) + vf_features, jnp.float16, sharding=sh)
    return out

  def lower(b):
    b = int(b)
    parallel.check_batch(b, setup.core.mesh, process_count=hosts(devices))
    return setup.step.lower(setup.core.abstract_state, batch(b))

  what = {"semvae": "Semantic VAE", "texture_vae": "texture VAE"}[kind]
  recipe = str(config.loss.get("name", "")) if kind == "texture_vae" else "semvae"
  return Program(
      name="vae_train", title=f"{what} train step ({recipe}{', GAN' if gan else ''})",
      batch=int(config.batch_size), batch_field="config.batch_size",
      batch_unit=parallel.batch_devices(setup.core.mesh), lower=lower, searchable=True,
      settings={"kind": kind, "recipe": recipe, "gan": gan, "mesh": dict(setup.core.mesh.shape),
                "frozen": sorted(nets or {}), "params": _param_count(setup.core)})


# ------------------------------------------------------------------ encode


def encode_program(config, devices) -> Program:
  """The encode job's program on the chips of host 0 (it runs per process)."""
  # pylint: disable=import-outside-toplevel
  from sfd_jax.data.encode import encode_batch
  from sfd_jax.models import dinov2, semantic_vae, texture_vae
  e = config.encode
  dtype = jnp.dtype(e.dtype)
  tcfg = texture_vae.TextureVAEConfig.preset(str(e.texture_vae_preset))
  dcfg = dinov2.DinoV2Config.preset(str(e.dinov2_preset))
  scfg = dataclasses.replace(semantic_vae.SemVAEConfig.preset(str(e.semvae_preset)),
                             input_dim=dcfg.embed_dim)
  nets = (nnx.eval_shape(lambda: texture_vae.TextureVAE(tcfg, rngs=nnx.Rngs(0), dtype=dtype)),
          nnx.eval_shape(lambda: dinov2.DinoV2(dcfg, rngs=nnx.Rngs(0), dtype=dtype)),
          nnx.eval_shape(lambda: semantic_vae.SemanticVAE(scfg, rngs=nnx.Rngs(0),
                                                          dtype=dtype)))
  host = [d for d in devices if d.process_index == devices[0].process_index]
  mesh = parallel.make_mesh({"data": -1}, host)
  batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  split = [nnx.split(n) for n in nets]
  graphdefs = tuple(g for g, _ in split)
  states = tuple(_sharded(s, rep) for _, s in split)
  fn = jax.jit(encode_batch, static_argnums=(0, 1, 2),
               compiler_options=dict(jit_lib.compiler_options(config.job)) or None)
  key = jax.eval_shape(lambda: jax.random.key(0))
  size = int(e.image_size)

  def lower(b):
    b = int(b)
    if b % mesh.size:
      raise PlanError(f"encode batch {b} is not a multiple of the {mesh.size} chips of a host")
    return fn.lower(graphdefs, int(e.dino_size), bool(e.store_repa), states,
                    jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=batch_sh),
                    jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
                    jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))

  return Program(
      name="encode", title=f"encode (texture VAE {e.texture_vae_preset}, DINOv2 "
      f"{e.dinov2_preset}, SemVAE {e.semvae_preset}; one host)",
      batch=int(e.per_device_batch) * mesh.size,
      batch_field=f"config.encode.per_device_batch × {mesh.size} chips per host",
      batch_unit=mesh.size, lower=lower, searchable=True,
      settings={"dtype": str(dtype), "chips_per_host": mesh.size, "image_size": size,
                "dino_size": int(e.dino_size)})


__all__ = ["KINDS", "Program", "config_kind", "dit_train_programs", "sample_program",
           "vae_program", "encode_program", "guide_config", "attention_choice"]
