"""Converter CLIs beyond their presets: ``--config-json`` with the reference
constructors' argument names (DINOv2, SemVAE) or the LDM config (texture VAE), and the
config builders behind them. The parity fixtures' tiny networks are converted once
through their preset and once through ``--config-json``: same config, same weights."""
import json

import jax
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from sfd_jax.convert import dinov2 as dino_conv
from sfd_jax.convert import semantic_vae as semvae_conv
from sfd_jax.convert import texture_vae as tvae_conv
from sfd_jax.convert.common import ConversionError, load_params
from sfd_jax.models.dinov2 import DinoV2Config
from sfd_jax.models.semantic_vae import SemVAEConfig
from sfd_jax.models.texture_vae import TextureVAEConfig
from tests.conftest import parity_dir

DINO_TINY = {"img_size": 518, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 4,
             "init_values": 1.0, "num_register_tokens": 4, "interpolate_antialias": True,
             "interpolate_offset": 0.0, "ffn_layer": "mlp", "block_chunks": 0,
             "drop_path_rate": 0.0}
SEMVAE_TINY = {"input_dim": 96, "bottleneck_dim": 8, "hidden_dim": 64, "arch": "transformer",
               "transformer_heads": 4, "transformer_blocks": 2, "is_vae": True}
LDM_TINY = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
    "embed_dim": 4, "ddconfig": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                                 "attn_resolutions": [8], "z_channels": 4, "resolution": 32,
                                 "in_channels": 3, "out_ch": 3, "dropout": 0.0,
                                 "double_z": True}}}}


def _fixture(name):
  path = parity_dir() / f"{name}.npz"
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found")
  return str(path)


def _same(a, b):
  (pa, ma), (pb, mb) = load_params(a), load_params(b)
  assert ma["config"] == mb["config"]
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
  return ma


@pytest.mark.parametrize("name,module,preset,fields", [
    ("dinov2", dino_conv, "tiny", DINO_TINY),
    ("semvae", semvae_conv, "tiny", SEMVAE_TINY),
    ("texture_vae", tvae_conv, "tiny", LDM_TINY)])
def test_config_json_equals_preset(tmp_path, name, module, preset, fields):
  src = _fixture(name)
  module.main(["--src", src, "--dst", str(tmp_path / "preset"), "--preset", preset])
  cfg_file = tmp_path / "config.json"
  cfg_file.write_text(json.dumps(fields))
  module.main(["--src", src, "--dst", str(tmp_path / "json"), "--config-json", str(cfg_file)])
  _same(str(tmp_path / "preset"), str(tmp_path / "json"))


def test_sfd_jax_field_names_work_too(tmp_path):
  src = _fixture("semvae")
  fields = {"input_dim": 96, "bottleneck_dim": 8, "hidden_dim": 64, "num_heads": 4,
            "num_blocks": 2}
  semvae_conv.main(["--src", src, "--dst", str(tmp_path / "a"), "--config-json",
                    json.dumps(fields)])
  semvae_conv.main(["--src", src, "--dst", str(tmp_path / "b"), "--preset", "tiny"])
  _same(str(tmp_path / "a"), str(tmp_path / "b"))
  # A mismatching architecture is a conversion error naming the key.
  wrong = {**SEMVAE_TINY, "transformer_blocks": 3}
  with pytest.raises(ConversionError, match=r"missing key 'encoder\.3\."):
    semvae_conv.main(["--src", src, "--dst", str(tmp_path / "c"), "--config-json",
                      json.dumps(wrong)])


def test_reference_config_builders():
  assert DinoV2Config.from_hub_name("dinov2_vitb14_reg") == DinoV2Config.vitb14_reg()
  large = DinoV2Config.from_hub_name("dinov2_vitl14_reg")
  assert (large.embed_dim, large.depth, large.num_heads, large.num_register_tokens) == \
      (1024, 24, 16, 4)
  small = DinoV2Config.from_reference_kwargs(dict(arch_name="vit_small", img_size=518,
                                                  patch_size=14, init_values=1.0,
                                                  num_register_tokens=4,
                                                  interpolate_antialias=True,
                                                  interpolate_offset=0.0))
  assert (small.embed_dim, small.num_heads) == (384, 6)
  with pytest.raises(ValueError, match="SwiGLU"):
    DinoV2Config.from_reference_kwargs({"ffn_layer": "swiglufused"})
  with pytest.raises(ValueError, match="unknown DINOv2 constructor arguments"):
    DinoV2Config.from_reference_kwargs({"embed_dims": 768})
  assert SemVAEConfig.from_reference_kwargs({"model": {
      "input_dim": 768, "bottleneck_dim": 16, "hidden_dim": 768, "arch": "transformer",
      "transformer_heads": 6, "transformer_blocks": 4, "is_vae": True}}) == SemVAEConfig.ch16()
  with pytest.raises(ValueError, match="arch='mlp'"):
    SemVAEConfig.from_reference_kwargs({"arch": "mlp"})
  assert tvae_conv.config_from_fields(LDM_TINY) == TextureVAEConfig.tiny()
  assert tvae_conv.config_from_fields(LDM_TINY["model"]["params"]) == TextureVAEConfig.tiny()
  assert tvae_conv.config_from_fields(TextureVAEConfig.tiny().to_dict()) == \
      TextureVAEConfig.tiny()
