"""Tests of the autoencoder training loop (sfd_jax.training.vae) on tiny models.

For both the SemVAE (on synthetic low-rank feature records) and the texture VAE (on a
folder of smooth synthetic images with one corrupt file): the loss goes down, and a
run preempted by a real SIGTERM after k steps and resumed to n gives parameters
identical to a run of n steps straight. The runs use a 2-device mesh (fsdp = 2: parameters, their
optimizer moments and the batch are split over it; Orbax checkpointing of 8-way
replicated arrays costs several times more on CPU).
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sfd_jax  # noqa: F401  (package set-up)
from configs import semvae_ch16, tiny_vae
from sfd_jax.checkpoint import export
from sfd_jax.convert import networks
from sfd_jax.core import trees
from sfd_jax.data import features, vae_pipeline
from sfd_jax.training import optim
from sfd_jax.training import vae as vae_train
from tests.util import preempted_at

STEPS, PREEMPT = 8, 3
DEVICES = 2


class Recorder:
  """A clu-style metric writer that keeps what it is given."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})

  def write_hparams(self, hparams):
    self.hparams = dict(hparams)

  def flush(self):
    pass


def _features_dir(root):
  rng = np.random.default_rng(0)
  basis = rng.normal(size=(3, 32)).astype(np.float32)
  feats = rng.normal(size=(48, 16, 3)).astype(np.float32) @ basis
  d = os.path.join(root, "features")
  features.write_feature_dataset(d, feats, [i % 4 for i in range(48)],
                                         records_per_shard=20)
  return d


def _images_dir(root):
  rng = np.random.default_rng(1)
  d = os.path.join(root, "images")
  yy, xx = np.mgrid[0:24, 0:20] / 24.0
  for c in range(2):
    os.makedirs(os.path.join(d, f"class{c}"))
    for j in range(12):
      phase = rng.uniform(0, 6, size=3)
      img = 127.5 + 100 * np.sin(4 * xx[..., None] + 3 * yy[..., None] + phase)
      Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"class{c}", f"{j}.png"))
  with open(os.path.join(d, "class1", "broken.png"), "wb") as f:
    f.write(b"\x89PNG not really")
  return d


def _config(kind, data, **overrides):
  c = tiny_vae.get_config(f"job={kind},data={data},steps={STEPS}")
  c.mesh.update(data=1, fsdp=DEVICES)
  c.checkpoint_every_steps = 100  # saves only at the end and on preemption (speed)
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _params(out):
  return jax.tree.leaves(jax.device_get(out["state"]["params"]))


def _host_random_weights(c, kind, directory):
  """A converted-weights folder with host-drawn random weights (``init_from``; the
  texture VAE's own random initialiser takes long to compile on CPU)."""
  from sfd_jax.convert import common  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.texture_vae import TextureVAE  # pylint: disable=import-outside-toplevel
  model = networks.random_network(
      TextureVAE, vae_train.model_config(c, kind), None, 3)
  params = trees.to_numpy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return common.save_params(directory, params, meta={"kind": kind})


@pytest.mark.parametrize("kind", ["semvae", "texture_vae"])
def test_loss_decreases_and_resume_is_exact(kind, tmp_path):
  data = _features_dir(tmp_path) if kind == "semvae" else _images_dir(tmp_path)
  init = {}
  if kind == "texture_vae":  # start from given weights (config.init_from)
    init["init_from"] = _host_random_weights(_config(kind, data), kind,
                                             str(tmp_path / "init"))
  c = _config(kind, data, **init)
  if kind == "semvae":  # evaluation on the training features, twice per run
    c.data.eval_path = data
    c.eval.every_steps = 4
  rec = Recorder()
  setup = vae_train.build_setup(c, kind, jax.devices()[:DEVICES])   # one compile, 3 runs
  train = lambda cfg, d, w: vae_train.train_model(  # noqa: E731
      cfg, str(tmp_path / d), kind, writer=w, setup=setup)
  straight = train(c, "straight", rec)
  assert straight["step"] == STEPS
  losses = [rec.scalars[s]["loss"] for s in range(1, STEPS + 1)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  if kind == "semvae":
    assert {"eval_mse", "eval_cos_sim", "eval_cos_sim_token_axis"} <= set(rec.scalars[4])
    assert rec.scalars[1]["lr"] == pytest.approx(1e-3 * 0.01)    # warm-up from 0.01×

  # Sharded from birth: some weight is split over fsdp, its Adam moments follow it.
  state = straight["state"]
  specs = jax.tree.leaves(jax.tree.map(lambda a: a.sharding.spec, state["params"]))
  assert any("fsdp" in str(s) for s in specs)
  mu = state["opt_state"][0].mu
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding.spec, mu)) == specs

  # Preempted by SIGTERM after PREEMPT steps (checkpoint saved), then resumed.
  with preempted_at(vae_pipeline, "make_train_iterator", PREEMPT):
    first = train(_config(kind, data, **init), "resumed", Recorder())
  assert first["step"] == PREEMPT
  rec2 = Recorder()
  second = train(_config(kind, data, **init), "resumed", rec2)
  assert second["step"] == STEPS and min(rec2.scalars) == PREEMPT + 1
  assert rec2.hparams["num_train_steps"] == STEPS      # hparams logged on a resume too
  for a, b in zip(_params(straight), _params(second)):
    np.testing.assert_array_equal(a, b)
  for s in range(PREEMPT + 1, STEPS + 1):
    assert rec2.scalars[s]["loss"] == rec.scalars[s]["loss"]

  # Exported as a converted-weights folder, the trained model loads like converted
  # reference weights (what --mode=encode reads).
  dst = export.export_converted(c, str(tmp_path / "straight"), kind,
                                str(tmp_path / "export"))
  loaded = networks.load_network(kind, dst)
  assert loaded.config == vae_train.model_config(c, kind)
  exported = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
  for a, b in zip(_params(straight), exported):
    np.testing.assert_array_equal(a, b)


def test_semvae_schedule_is_the_reference_recipe():
  """warm-up 500 from 0.01×, constant to 800.5k, cosine to 0.1× at 1M (docs/method.md §3.4)."""
  c = semvae_ch16.get_config()
  _, schedule = optim.make_optimizer(c.optimizer)
  lr = lambda s: float(schedule(s))  # noqa: E731
  assert lr(0) == pytest.approx(5e-7)
  assert lr(250) == pytest.approx(5e-7 + 0.5 * (5e-5 - 5e-7))
  assert lr(500) == pytest.approx(5e-5) and lr(800_500) == pytest.approx(5e-5)
  assert lr(900_250) == pytest.approx(5e-5 * (0.1 + 0.9 * 0.5), rel=1e-4)
  assert lr(1_000_000) == pytest.approx(5e-6)
  assert (c.optimizer.weight_decay, c.batch_size, c.loss.kl_weight) == (0.01, 64, 1e-7)
  assert c.loss.cos_axis == "token"


def test_model_config_and_extra_terms_errors():
  c = tiny_vae.get_config("job=texture_vae")
  c.model.dropout = 0.1
  with pytest.raises(ValueError, match="dropout"):
    vae_train.model_config(c, "texture_vae")
  with pytest.raises(ValueError, match="not one of"):
    vae_train.model_config(c, "dit")
  c = tiny_vae.get_config("job=texture_vae")
  c.loss.extra_terms = "lpips"
  with pytest.raises(ValueError, match="unknown term.*lpips"):
    vae_train._extra_terms(c.loss)  # pylint: disable=protected-access
  vae_train.register_generator_term("zero", lambda loss_cfg: lambda x, r, p: 0.0 * r.sum())
  try:
    c.loss.extra_terms = "zero"
    assert set(vae_train._extra_terms(c.loss)) == {"zero"}  # pylint: disable=protected-access
  finally:
    vae_train.GENERATOR_TERMS.pop("zero")


def test_image_iterator_drops_bad_images_flips_and_replays(tmp_path):
  c = _config("texture_vae", _images_dir(tmp_path))
  c.data.random_flip = True
  it = vae_pipeline.make_train_iterator(c, "texture_vae", process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]   # 72 elements: 3 epochs of 24 + 1 bad image
  assert batches[0]["image"].shape == (8, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  state = it.get_state()
  ahead = [next(it)["image"] for _ in range(2)]
  it2 = vae_pipeline.make_train_iterator(c, "texture_vae", process_index=0, process_count=1)
  it2.set_state(state)
  for a in ahead:
    np.testing.assert_array_equal(next(it2)["image"], a)
  # The flip is a pure function of (seed, stream index), about half of the elements.
  flip = vae_pipeline._RandomFlip(c.seed)  # pylint: disable=protected-access
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  flipped = [not np.array_equal(flip.map_with_index(i, {"image": image})["image"], image)
             for i in range(200)]
  assert flipped == [vae_pipeline.pipeline.flip_choice(c.seed, i) for i in range(200)]
  assert 70 < sum(flipped) < 130
  assert flip.map_with_index(0, None) is None
