"""A training run of the wrong kind is named as such (``checkpoint.runs``): a field that
expects a LightningDiT or a texture VAE and is given a SemVAE, texture-VAE, GAN-recipe or
SFD run says which kind of run it got and what the field needs, before any weight is read.

The runs here hold only their saved config (the ``config`` item of checkpoint 2), which is
all the kind is read from."""
import sys

import orbax.checkpoint as ocp
import pytest

from sfd_jax.checkpoint import runs
from sfd_jax.core.errors import CheckpointError
from tests.conftest import REPO

sys.path.insert(0, str(REPO))


def _config(name, arg=None):
  import importlib  # pylint: disable=import-outside-toplevel
  return importlib.import_module(f"configs.{name}").get_config(arg).to_dict()


def _run(root, name, config):
  """A workdir whose checkpoint 2 holds only ``config``."""
  workdir = root / name
  mngr = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("config",))
  mngr.save(2, args=ocp.args.Composite(config=ocp.args.JsonSave(config)))
  mngr.wait_until_finished()
  mngr.close()
  return str(workdir)


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("run_kinds")
  return {
      "sfd": _run(root, "sfd", _config("tiny")),
      "semvae": _run(root, "semvae", _config("semvae_ch16")),
      "texture_vae": _run(root, "texture_vae", _config("texture_vae_f16d32")),
      "texture_vae_gan": _run(root, "gan", _config("texture_vae_f16d32_ldm")),
  }


@pytest.mark.parametrize("kind,words", [
    ("sfd", "an SFD (LightningDiT) training run"),
    ("semvae", "a SemVAE training run"),
    ("texture_vae", "a texture-VAE training run"),
    ("texture_vae_gan", "a texture-VAE GAN training run (loss.name='ldm')"),
])
def test_what_a_run_is(saved_runs, kind, words):
  assert runs.what_is(saved_runs[kind]) == words


def _one_line_error(reader, path, field):
  """The CheckpointError line ``reader(path, field)`` stops with (one line)."""
  with pytest.raises(CheckpointError) as e:
    reader(path, field)
  line = str(e.value)
  assert "\n" not in line
  return line


@pytest.mark.parametrize("kind", ["semvae", "texture_vae", "texture_vae_gan"])
def test_sample_checkpoint_of_another_trainer_is_named(saved_runs, kind):
  path = saved_runs[kind]
  line = _one_line_error(runs.dit_config, path, "config.sample.checkpoint")
  assert line.startswith(f"config.sample.checkpoint={path}/checkpoints is "
                         f"{runs.run_name(kind)}; config.sample.checkpoint needs a converted "
                         "or exported LightningDiT folder or an SFD training workdir"), line


@pytest.mark.parametrize("kind", ["sfd", "semvae"])
def test_texture_vae_field_given_another_run_is_named(saved_runs, kind):
  path = saved_runs[kind]
  line = _one_line_error(runs.check_texture_vae, path, "config.sample.texture_vae")
  assert runs.run_name(kind) in line and "config.sample.texture_vae" in line, line
  assert "needs a converted texture VAE folder or a texture-VAE training workdir" in line, line


def test_texture_vae_field_accepts_a_gan_run(saved_runs):
  """A GAN-recipe run is a texture-VAE run (its discriminator is not read)."""
  assert runs.check_texture_vae(saved_runs["texture_vae_gan"], "x") == "run"
