"""Encoding ImageNet for SFD (``--mode=encode``) and extracting SemVAE training
features (``--mode=extract``); see docs/encode.md.

  python main.py --mode=encode --config=configs/encode_imagenet.py --workdir=/data/in1k_sfd
  python main.py --mode=extract --config=configs/encode_imagenet.py:split=train \
      --workdir=/data/in1k_dino_train

Options (``--config=configs/encode_imagenet.py:source=tfds,split=val``):
  source: folder (``data.path`` = a folder of class sub-folders, e.g. ImageNet's
    ``train/`` with one folder per synset) | tfds (``imagenet2012`` from
    ``data.tfds_data_dir``, prepared once from the ILSVRC tars in ``tfds_manual_dir``)
  split: train | val (folder: ``<root>/train`` or ``<root>/val``; TFDS: train /
    validation). For the SemVAE's evaluation features use ``split=val`` with
    ``--config.data.max_images=500`` (the reference's first 500 validation images).
  root: folder holding the ImageNet splits (default data/imagenet)
  weights: folder holding the converted networks (default weights)

The workdir is the output dataset directory. The job's output is complete when its
index file exists (``dataset.json`` for encode, ``features.json`` for extract); rerun
the same command after an interruption.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, source="folder", split="train", root="data/imagenet",
                          weights="weights")
  if opts["split"] not in ("train", "val"):
    raise ValueError(f"split {opts['split']!r}: expected train or val")
  c = ml_collections.ConfigDict()
  c.seed = 42                     # image i draws its posterior noise from fold_in(key(seed), i)

  # --- images (sfd_jax.data.images.make_source) -------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = opts["source"]  # folder | tfds
  c.data.path = f"{opts['root']}/{opts['split']}"
  c.data.tfds_name = "imagenet2012"
  c.data.tfds_split = "train" if opts["split"] == "train" else "validation"
  c.data.tfds_data_dir = ""       # "" = TFDS default
  c.data.tfds_manual_dir = ""     # ILSVRC2012_img_{train,val}.tar, to prepare TFDS once
  c.data.max_images = 0           # first N images only (0 = all)

  # --- latent encoding (sfd_jax.encode) -------------------------------------------
  w = opts["weights"]
  c.encode = ml_collections.ConfigDict()
  c.encode.texture_vae = f"{w}/texture_vae_f16d32"   # python -m sfd_jax.convert.texture_vae
  c.encode.dinov2 = f"{w}/dinov2_vitb14_reg"         # python -m sfd_jax.convert.dinov2
  c.encode.semvae = f"{w}/semvae_ch16"               # python -m sfd_jax.convert.semantic_vae
  c.encode.random_init = False    # True: random weights of the presets below (smoke tests)
  c.encode.texture_vae_preset = "f16d32"
  c.encode.dinov2_preset = "vitb14_reg"
  c.encode.semvae_preset = "ch16"
  c.encode.dtype = "float32"      # the reference extracts in float32
  c.encode.image_size = 256       # ADM centre crop
  c.encode.dino_size = 224        # DINOv2 input (bicubic 256 -> 224, no antialias)
  c.encode.store_repa = True      # REPA target features (~89% of the bytes)
  c.encode.per_device_batch = 32
  c.encode.records_per_shard = 1000
  c.encode.stats_samples = 10_000  # unflipped records for the per-channel stats
  c.encode.stats_seed = 0

  # --- SemVAE training features (sfd_jax.extract_features) ------------------------
  c.extract = ml_collections.ConfigDict()
  c.extract.dinov2 = c.encode.dinov2
  c.extract.random_init = False
  c.extract.dinov2_preset = "vitb14_reg"
  c.extract.dtype = "float32"
  c.extract.resize = 256          # torchvision Resize(256, bicubic) on the short side
  c.extract.crop = 224            # CenterCrop(224)
  c.extract.per_device_batch = 64
  c.extract.records_per_shard = 5000

  # --- shared job settings (sfd_jax.data.images.run_sharded_job) ------------------
  c.job = ml_collections.ConfigDict()
  c.job.decode_threads = 16       # host threads decoding images
  c.job.prefetch_batches = 4
  c.job.log_every_batches = 50
  c.job.compression = "uncompressed"
  c.job.debug_stop_after_shards = -1   # testing: stop after writing this many shards
  c.job.compiler_options = ml_collections.ConfigDict()  # XLA options of the jitted steps
  return c
