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
from configs import common


def get_config(arg=None):
  return common.encode_config(arg)
