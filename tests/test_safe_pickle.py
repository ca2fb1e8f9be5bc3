"""The torch-free, code-free reader of ``.pt`` files (``sfd_jax.core.safe_pickle``):
checkpoints saved the way the reference's ``train.py`` saves them (``{"model", "ema",
"opt", "config": OmegaConf DictConfig}``) or with an ``argparse.Namespace`` convert, and
files whose unpickling would run code are refused or stay inert (marker files prove
nothing ran). The ``.pt`` files are written in torch's zip format without torch
(``tests/torch_format.py``)."""
import argparse
import pickle

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.checkpoint import export
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.core import safe_pickle
from sfd_jax.convert.common import ConversionError, load_state_dict
from sfd_jax.diffusion import samplers
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from tests import torch_format as tf

CFG = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, use_repa=False)


def _reference_weights(seed=0):
  model = LightningDiT(CFG, rngs=nnx.Rngs(seed))
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  params = jax.tree.unflatten(tree, [np.asarray(l) + 0.05 * rng.standard_normal(l.shape)
                                     .astype(np.float32) for l in leaves])
  return export.to_reference_state_dict(params, CFG)


def test_tensors_dtypes_and_shared_strided_storages(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.standard_normal((6, 8)).astype(np.float32)
  shared = tf.storage_of(base)
  arrays = {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f16": rng.standard_normal(5).astype(np.float16),
      "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
      "i64": np.arange(9, dtype=np.int64), "u8": np.arange(4, dtype=np.uint8),
      "bool": np.array([True, False]), "scalar": np.array(2.5, np.float64),
      "empty": np.zeros((0, 3), np.float32)}
  obj = {k: tf.Tensor(v) for k, v in arrays.items()}
  obj["cols"] = tf.Tensor(base[:, 2:5], base=shared, offset=2, stride=(8, 1))
  obj["transposed"] = tf.Tensor(base.T, base=shared, offset=0, stride=(1, 8))
  path = tf.save(obj, tmp_path / "t.pt")
  got = safe_pickle.load(path)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)
  np.testing.assert_array_equal(got["cols"], base[:, 2:5])
  np.testing.assert_array_equal(got["transposed"], base.T)
  # The state-dict reader casts floating arrays (bfloat16 included) to float32.
  sd = load_state_dict(path)
  assert sd["bf16"].dtype == np.float32 and sd["i64"].dtype == np.int64


def test_tensor_reaching_past_its_storage_is_an_error(tmp_path):
  small = tf.storage_of(np.zeros(4, np.float32))
  path = tf.save({"x": tf.Tensor(np.zeros((2, 3), np.float32), base=small)},
                 tmp_path / "bad.pt")
  with pytest.raises(pickle.UnpicklingError, match="reaches past its storage"):
    safe_pickle.load(path)


def _convert(src, dst, *extra):
  dit_conv.main(["--src", str(src), "--dst", str(dst), "--variant", "custom",
                 "--config-json", '{"input_size": 4, "hidden_size": 32, "depth": 2, '
                 '"num_heads": 2, "use_repa": false}', *extra])
  return dit_conv.load_converted(str(dst))


def _same_model(a, b):
  pa = jax.tree.leaves(nnx.to_pure_dict(nnx.state(a, nnx.Param)))
  pb = jax.tree.leaves(nnx.to_pure_dict(nnx.state(b, nnx.Param)))
  assert len(pa) == len(pb)
  for x, y in zip(pa, pb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 48))
  y = jnp.array([1, 2])
  xa = samplers.sample(a, z, y, method="euler", num_steps=4).x
  xb = samplers.sample(b, z, y, method="euler", num_steps=4).x
  np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))   # samples identically


def test_reference_train_checkpoint_with_omegaconf_config_converts(tmp_path):
  sd = _reference_weights()
  alone = tmp_path / "alone.npz"
  np.savez(alone, **sd)
  raw = _reference_weights(seed=1)           # "model" (raw weights) differ from "ema"
  train_config = {"model": {"model_type": "LightningDiT-B/1", "use_qknorm": True,
                            "semfirst_delta_t": 0.3, "in_chans": 48},
                  "train": {"max_steps": 4000000, "global_seed": 0},
                  "sample": {"cfg_scale": 1.5, "balanced_sampling": True}}
  opt = {"state": {0: {"step": tf.Tensor(np.array(3.0, np.float32)),
                       "exp_avg": tf.Tensor(np.ones((2, 2), np.float32))}},
         "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
  ckpt = tf.save({"model": tf.tensors(raw), "ema": tf.tensors(sd), "opt": opt,
                  "config": tf.omegaconf_like(train_config)}, tmp_path / "0400000.pt")
  # The config object is readable as plain data, but nothing of it was constructed.
  obj = safe_pickle.load(ckpt)
  assert isinstance(obj["config"], safe_pickle.StandIn)
  assert obj["config"].global_name == "omegaconf.dictconfig.DictConfig"
  assert safe_pickle.to_plain(obj["config"]) == train_config
  a = _convert(ckpt, tmp_path / "from_pt")                 # takes "ema"
  b = _convert(alone, tmp_path / "from_alone")
  _same_model(a, b)
  c = _convert(ckpt, tmp_path / "raw", "--entry", "model")
  np.testing.assert_array_equal(np.asarray(c.x_embedder.kernel[...]),
                                raw["x_embedder.proj.weight"][:, :, 0, 0].T)


def test_checkpoint_with_argparse_namespace_converts(tmp_path):
  sd = _reference_weights()
  args = argparse.Namespace(model="LightningDiT-B/1", lr=1e-4, ckpt_every=10000,
                            data_path="/data/imagenet")
  ckpt = tf.save({"model": tf.tensors(sd), "args": args, "steps": 70000},
                 tmp_path / "0070000.pt")
  obj = safe_pickle.load(ckpt)
  assert safe_pickle.to_plain(obj["args"]) == {"__class__": "argparse.Namespace",
                                               "state": vars(args)}
  np.savez(tmp_path / "alone.npz", **sd)
  _same_model(_convert(ckpt, tmp_path / "a"), _convert(tmp_path / "alone.npz",
                                                       tmp_path / "b"))


@pytest.mark.parametrize("payload", ["os_system", "exec", "exec_in_config"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload):
  marker = tmp_path / "MARKER"
  sd = tf.tensors(_reference_weights())
  evil = {"os_system": tf_os_system(marker),
          "exec": tf_exec(marker),
          "exec_in_config": {"train": {"lr": 1e-4, "hook": tf_exec(marker)}}}[payload]
  # Sanity: a normal unpickler really would run it.
  pkl, _ = tf.dumps(evil)
  pickle.loads(pkl)
  assert marker.exists()
  marker.unlink()
  ckpt = tf.save({"ema": sd, "config": evil}, tmp_path / "evil.pt")
  with pytest.raises(safe_pickle.UnsafePickleError, match="refused: the pickle refers to "
                     r"((posix|nt|os)\.system|(__builtin__|builtins)\.exec)"):
    safe_pickle.load(ckpt)
  with pytest.raises(ConversionError, match="Nothing from the file was executed"):
    _convert(ckpt, tmp_path / "out")
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


def tf_os_system(marker):
  return tf.OsSystem(f"touch {marker}")


def tf_exec(marker):
  return tf.Exec(f"open({str(marker)!r}, 'w').write('ran')")


def test_unknown_callables_and_setstate_stay_inert(tmp_path):
  """Globals on no deny-list (here an importable function that writes a file, and a
  class whose __setstate__ does) become stand-ins: neither is ever called."""
  marker = tmp_path / "MARKER"
  payloads = {"call": tf.CallFunction(str(marker)),
              "build": tf.NewObj(tf.Global("tests.torch_format", "MarkerOnSetstate"), (),
                                 {"marker": str(marker)})}
  sd = tf.tensors(_reference_weights())
  ckpt = tf.save({"ema": sd, **payloads}, tmp_path / "inert.pt")
  pickle.loads(tf.dumps(payloads)[0])           # a normal unpickler runs both ...
  assert marker.exists()
  marker.unlink()
  obj = safe_pickle.load(ckpt)                  # ... the restricted one neither
  assert not marker.exists()
  assert obj["call"].global_name == "tests.torch_format.write_marker"
  assert obj["call"].args == (str(marker),)
  assert obj["build"].state == {"marker": str(marker)}
  _convert(ckpt, tmp_path / "out")              # the weights still convert
  assert not marker.exists()
  # Protocol 0 (INST / REDUCE via text opcodes) is handled the same way.
  assert isinstance(safe_pickle.loads(pickle.dumps(tf.CallFunction(str(marker)),
                                                   protocol=0)), safe_pickle.StandIn)
  assert not marker.exists()


def test_top_level_non_state_dict_is_an_error(tmp_path):
  path = tf.save(tf.Reduce(tf.Global("somewhere", "Thing"), (1, 2)), tmp_path / "x.pt")
  with pytest.raises(ConversionError, match="expected a state dict, found <stand-in for "
                     "somewhere.Thing>"):
    load_state_dict(path)


def test_extension_registry_opcodes_are_refused():
  data = b"\x80\x02\x82\x01)R."        # PROTO 2, EXT1 1, EMPTY_TUPLE, REDUCE, STOP
  with pytest.raises(safe_pickle.UnsafePickleError, match="extension registry"):
    safe_pickle.loads(data)
