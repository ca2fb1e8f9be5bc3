"""Training the Semantic VAE on DINOv2-B/14-reg patch features (``--mode=train_semvae``).

  python main.py --mode=extract --config=configs/encode_imagenet.py --workdir=/data/in1k_dino
  python main.py --mode=train_semvae --config=configs/semvae_ch16.py:data=/data/in1k_dino \
      --workdir=runs/semvae_ch16

The reference recipe (``semvae_train/ch16.yaml`` + ``train.py``, SPEC §3.4): transformer
VAE 768 → 16 channels per token (hidden 768, 6 heads, 4 blocks), loss MSE + token-axis
cosine + 1e-7·KL, AdamW lr 5e-5 (β 0.9/0.999, eps 1e-8, weight decay 0.01, no
clipping), linear warm-up from 0.01× over 500 steps, constant, cosine to 0.1× over the
last 199,500 of 1,000,000 steps, batch 64, bf16 compute. The reference evaluates every
2000 steps on 500 validation images (``data.eval_path``: features of the first 500
validation images, ``--mode=extract`` with ``split=val`` and ``data.max_images=500``).

Options: ``data`` (training feature dir), ``eval`` (evaluation feature dir).
"""
import ml_collections

from configs import common


def add_run_fields(c: ml_collections.ConfigDict, *, batch_size: int, num_train_steps: int,
                   checkpoint_every_steps: int, keep_period: int) -> ml_collections.ConfigDict:
  """Loop, checkpoint, mesh and data-loader fields shared by the VAE training configs."""
  c.seed = 0                      # init, noise stream fold_in(key(seed), step), data order
  c.batch_size = batch_size       # global batch
  c.num_train_steps = num_train_steps
  c.log_every_steps = 100
  c.checkpoint_every_steps = checkpoint_every_steps
  c.keep_checkpoints = 3          # most recent kept ...
  c.keep_period = keep_period     # ... plus every keep_period-th step forever (0 = none)
  c.init_from = ""                # converted weights folder (sfd_jax.convert.*) to start from
  c.debug_preempt_at_step = -1    # testing: send ourselves SIGTERM after this step
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # small models: data parallel over all devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.strict_sharding = False
  c.compiler_options = ml_collections.ConfigDict()  # XLA options of init / step / eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 2000       # with data.eval_path set
  c.eval.max_examples = 0         # 0 = the whole evaluation set
  return c


def get_config(arg=None):
  opts = common.parse_arg(arg, data="data/imagenet_dino_train", eval="")
  c = ml_collections.ConfigDict()
  add_run_fields(c, batch_size=64, num_train_steps=1_000_000,
                 checkpoint_every_steps=10_000, keep_period=100_000)

  # --- model (sfd_jax.models.semantic_vae.SemVAEConfig fields) ------------------------
  c.model = ml_collections.ConfigDict()
  c.model.input_dim = 768
  c.model.bottleneck_dim = 16
  c.model.hidden_dim = 768
  c.model.num_heads = 6
  c.model.num_blocks = 4
  c.model.mlp_ratio = 4.0
  c.model.norm_eps = 1e-5
  c.model.dtype = "bfloat16"      # compute (the reference trains with bf16 autocast)
  c.model.param_dtype = "float32"

  # --- loss (sfd_jax.diffusion.semvae_loss.semvae_loss) ------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.mse_weight = 1.0
  c.loss.l1_weight = 0.0
  c.loss.cos_weight = 1.0
  c.loss.kl_weight = 1e-7
  c.loss.cos_axis = "token"       # reference's dim=1 cosine (SPEC §12.14); "channel": per token

  # --- optimizer (sfd_jax.optim) ---------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 0.0
  c.optimizer.schedule = "warmup_constant_cosine"
  c.optimizer.warmup_steps = 500
  c.optimizer.warmup_init_factor = 0.01
  c.optimizer.total_steps = 1_000_000
  c.optimizer.decay_steps = 199_500
  c.optimizer.final_factor = 0.1

  # --- data: feature datasets written by --mode=extract -------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.path = opts["data"]
  c.data.eval_path = opts["eval"]
  c.data.num_workers = 4          # Grain worker processes per host (0: in-process)
  c.data.read_threads = 4
  c.data.prefetch_batches = 4
  return c
