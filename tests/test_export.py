"""Export: training checkpoint -> converted Orbax checkpoint and reference (PyTorch) layout."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax import checkpoint as ckpt_lib
from sfd_jax.core.errors import CheckpointError
from sfd_jax.checkpoint import export as export_lib
from sfd_jax.jobs import export
from sfd_jax.convert import lightning_dit as conv
from sfd_jax.convert.common import load_state_dict, save_params
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from tests.conftest import parity_dir

_BUFFERS = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")


def _fixture_cases():
  # (fixture, key prefix, config entry)
  return [("lightningdit_sfd", "", "model_kwargs"), ("lightningdit_sfd", "guide/", "guide_kwargs"),
          ("lightningdit_sync", "", "model_kwargs")]


def _assert_same_state_dict(got, ref, name):
  assert sorted(got) == sorted(ref), (f"{name}: keys differ: missing "
                                      f"{sorted(set(ref) - set(got))}, extra "
                                      f"{sorted(set(got) - set(ref))}")
  for k in ref:
    assert got[k].shape == ref[k].shape, f"{name}: {k} {got[k].shape} != {ref[k].shape}"
    if k in _BUFFERS:      # recomputed from the config
      np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=f"{name}: {k}")
    else:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}: {k}")


@pytest.mark.parametrize("fixture,prefix,kwargs", _fixture_cases())
def test_reference_layout_round_trip(parity, tmp_path, fixture, prefix, kwargs):
  """fixture -> ours (convert) -> reference layout (export) gives every key back."""
  z = parity(fixture)
  cfg = DiTConfig.from_reference_kwargs(json.loads(str(z["config"]))[kwargs])
  path = str(parity_dir() / f"{fixture}.npz")
  ref = load_state_dict(path, prefix=prefix)
  params = conv.convert_lightning_dit(ref, cfg, name=path)
  _assert_same_state_dict(export_lib.to_reference_state_dict(params, cfg), ref,
                          f"{fixture}:{prefix or 'main'}")

  # ... and through the files: converted dir -> `python -m sfd_jax.checkpoint.export` -> files.
  save_params(tmp_path / "conv", params, conv.config_to_meta(cfg))
  assert export_lib.main(["--src", str(tmp_path / "conv"), "--dst", str(tmp_path / "out"),
                      "--formats", "safetensors,npz"]) == 0
  for name in ("lightning_dit.safetensors", "lightning_dit.npz"):
    _assert_same_state_dict(load_state_dict(tmp_path / "out" / name), ref, name)


def test_reference_layout_inverts_converter_with_patches():
  """patch_size 2 (the fixtures have 1): the (D, C, p, p) kernel layout round-trips."""
  cfg = DiTConfig(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                  repa_dim=8, repa_projector_dim=16)
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  sd = export_lib.to_reference_state_dict(params, cfg)
  assert sd["x_embedder.proj.weight"].shape == (32, 48, 2, 2)
  assert sd["pos_embed"].shape == (1, 4, 32) and sd["feat_rope.freqs_cos"].shape == (4, 16)
  back = conv.convert_lightning_dit(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_to_reference_checks_shapes():
  cfg = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, use_repa=False)
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)
  with pytest.raises(export_lib.ExportError, match="x_embedder/kernel.*expects"):
    export_lib.to_reference_state_dict(params, dataclasses.replace(cfg, in_channels=40,
                                                               semantic_chans=8))
  with pytest.raises(export_lib.ExportError, match="3 blocks|depth=3"):
    export_lib.to_reference_state_dict(params, dataclasses.replace(cfg, depth=3))


# ----------------------------------------------------------------------------------
# From a training checkpoint (the --mode=export job)
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A training workdir with checkpoints at steps 3 and 5 whose EMA differs from params.

  The state has the trainer's exact tree and shardings (``TrainSetup``), but its values
  are random host arrays: compiling the real initialiser would cost seconds for nothing.
  """
  from configs import tiny
  from sfd_jax.training import sfd as train
  workdir = str(tmp_path_factory.mktemp("export_run"))
  config = tiny.get_config("data=/nonexistent")
  setup = train.build(config)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype),
                        setup.abstract_state["params"])
  opt_state = jax.tree.map(np.asarray, setup.tx.init(params))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  saved = {}
  for step in (3, 5):
    ema = jax.tree.map(lambda a: (a + 0.05 * rng.normal(size=a.shape)).astype(a.dtype), params)
    host = {"step": np.int32(step), "nonfinite": np.int32(0), "params": params, "ema": ema,
            "opt_state": opt_state}
    ckpt.save(step, jax.device_put(host, setup.state_shardings), {}, config.to_dict())
    saved[step] = {"ema": ema, "params": params}
  ckpt.close()
  return {"workdir": workdir, "config": config, "saved": saved, "cfg": setup.model_cfg,
          "setup": setup}


def _export_config(config, **export_fields):
  c = config.copy_and_resolve_references()
  for k, v in export_fields.items():
    setattr(c.export, k, v)
  return c


def _inputs(cfg, n=2):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(n, cfg.input_size, cfg.input_size, cfg.in_channels)),
                  jnp.float32)
  return x, jnp.asarray([0.2, 0.9]), jnp.asarray([0.5, 1.0]), jnp.asarray([1, 1000])


@nnx.jit
def _apply(model, x, t_tex, t_sem, y):
  return model(x, t_tex, t_sem, y)


def _forward(model, cfg):
  return np.asarray(_apply(model, *_inputs(cfg)))


def _reference_model(trained, params):
  """The training code's own view of ``params`` (TrainSetup.model), for comparison."""
  return trained["setup"].model(jax.tree.map(jnp.asarray, params))


def test_export_latest_ema_loads_and_reproduces_forward(trained, tmp_path):
  dst = str(tmp_path / "ema")
  out = export.run(_export_config(trained["config"], dst=dst,
                                  formats="orbax,safetensors,npz"), trained["workdir"])
  assert out["step"] == 5 and out["weights"] == "ema"
  assert sorted(os.listdir(dst)) == ["export.json", "lightning_dit.npz",
                                     "lightning_dit.safetensors", "meta.json", "params"]
  cfg = trained["cfg"]
  loaded = conv.load_converted(dst)
  assert loaded.cfg == cfg
  expected = trained["saved"][5]["ema"]
  got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, expected)
  ref_model = _reference_model(trained, expected)
  np.testing.assert_allclose(_forward(loaded, cfg), _forward(ref_model, cfg), atol=1e-6, rtol=0)
  # The reference-layout file converts back to the same weights.
  sd = load_state_dict(os.path.join(dst, "lightning_dit.safetensors"))
  back = conv.convert_lightning_dit(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, expected)
  with open(os.path.join(dst, "export.json")) as f:
    manifest = json.load(f)
  assert manifest["step"] == 5 and manifest["source"].endswith("checkpoints/5")


def test_export_step_and_raw_params(trained, tmp_path):
  out = export.run(_export_config(trained["config"], step=3, weights="params",
                                  formats="orbax"), trained["workdir"])
  assert out["dst"] == os.path.join(trained["workdir"], "export", "3-params-float32")
  assert sorted(os.listdir(out["dst"])) == ["export.json", "meta.json", "params"]
  got = nnx.to_pure_dict(nnx.state(conv.load_converted(out["dst"]), nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got,
               trained["saved"][3]["params"])


def _size(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_bf16_export_halves_size_and_loads(trained, tmp_path):
  sizes = {}
  for dtype in ("float32", "bfloat16"):
    dst = str(tmp_path / dtype)
    export.run(_export_config(trained["config"], dtype=dtype, dst=dst), trained["workdir"])
    sizes[dtype] = {n: _size(os.path.join(dst, n)) for n in ("params", "lightning_dit.safetensors")}
  ratio = {n: sizes["bfloat16"][n] / sizes["float32"][n] for n in sizes["float32"]}
  assert 0.49 < ratio["lightning_dit.safetensors"] < 0.52, ratio
  assert ratio["params"] < 0.55, ratio      # zstd-compressed Orbax chunks + metadata
  sd = load_state_dict(str(tmp_path / "bfloat16" / "lightning_dit.safetensors"))
  assert {str(v.dtype) for v in sd.values()} == {"bfloat16"}
  cfg = trained["cfg"]
  loaded = conv.load_converted(str(tmp_path / "bfloat16"))     # params upcast to float32
  rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(np.float32),
                         trained["saved"][5]["ema"])
  got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got,
               rounded)
  full = _forward(_reference_model(trained, trained["saved"][5]["ema"]), cfg)
  np.testing.assert_allclose(_forward(loaded, cfg), full, atol=0.05 * np.abs(full).max())


def test_export_errors(trained, tmp_path):
  config, workdir = trained["config"], trained["workdir"]
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 4.*\[3, 5\]"):
    export.run(_export_config(config, step=4, dst=str(tmp_path / "a")), workdir)
  with pytest.raises(export_lib.ExportError, match="config.export.weights='raw'"):
    export.run(_export_config(config, weights="raw"), workdir)
  with pytest.raises(export_lib.ExportError, match="unknown.*'onnx'"):
    export.run(_export_config(config, formats="orbax,onnx"), workdir)
  with pytest.raises(export_lib.ExportError, match=r"unknown fields \['formt'\]"):
    export.run(_export_config(config, formt="npz"), workdir)
  with pytest.raises(CheckpointError, match="no checkpoint directory"):
    export.run(config, str(tmp_path / "empty"))
  dst = str(tmp_path / "taken")
  os.makedirs(dst)
  open(os.path.join(dst, "x"), "w").close()
  with pytest.raises(FileExistsError, match="not empty.*overwrite"):
    export.run(_export_config(config, dst=dst, formats="npz"), workdir)
  export.run(_export_config(config, dst=dst, formats="npz", overwrite=True), workdir)
  assert sorted(os.listdir(dst)) == ["export.json", "lightning_dit.npz", "x"]
