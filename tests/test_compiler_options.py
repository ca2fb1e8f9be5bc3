"""XLA compiler options: the CPU default of the inference programs (sampling, decoding)
and the config's ``compiler_options`` reaching the DiT train step."""
import jax
import jax.numpy as jnp

from sfd_jax.core import jit as jit_lib
from tests.util import tiny, write_tiny_latents


def _optimized_hlo(options):
  a = jnp.ones((64, 64), jnp.float32)
  return jax.jit(lambda a: jax.nn.silu(a @ a) @ a).lower(a).compile(
      compiler_options=dict(options) or None).as_text()


def test_inference_default_on_cpu_turns_ynnpack_fusions_off():
  assert jax.default_backend() == "cpu"
  opts = jit_lib.inference_options()
  assert opts == jit_lib.CPU_INFERENCE_OPTIONS
  assert "__ynn_fusion" not in _optimized_hlo(opts)


def test_given_options_win_and_other_backends_get_none():
  given = (("xla_backend_optimization_level", 0),)
  assert jit_lib.inference_options(given) == given
  assert jit_lib.inference_options(backend="gpu") == ()
  assert jit_lib.inference_options(backend="tpu") == ()


def test_an_option_this_xla_lacks_is_left_out(monkeypatch):
  monkeypatch.setattr(jit_lib, "CPU_INFERENCE_OPTIONS", (("xla_cpu_no_such_option", ""),))
  assert jit_lib.inference_options() == ()


def test_train_config_compiler_options_reach_the_dit_step(tmp_path):
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  write_tiny_latents(str(tmp_path), n=16)
  config = tiny(str(tmp_path))
  config.compiler_options.xla_backend_optimization_level = 0
  setup = sfd.build(config)
  assert dict(setup.compiler_options) == {"xla_backend_optimization_level": 0}
