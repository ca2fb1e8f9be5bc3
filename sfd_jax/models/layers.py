"""Building blocks shared by every network in sfd_jax.

Every parameter is created through these helpers so that it carries *logical* axis
names (metadata ``out_sharding``); ``sfd_jax.parallel`` maps them to mesh axes with
the rule table of the config. Vocabulary of logical names:

==============  =====================================================================
``embed``       model width of a transformer (DiT hidden D, ViT width)
``mlp``         feed-forward hidden width (SwiGLU hidden, ViT/SemVAE MLP hidden)
``qkv``         fused query/key/value output (3·D)
``heads``       attention output-projection input (D, split by heads)
``adaln``       adaLN modulation output (k·D)
``vocab``       rows of an embedding table (class labels)
``freq``        sinusoidal frequency features of a timestep embedder
``channels``    input/output channels of a latent or feature (48, 768, ...)
``repa``        hidden width of the REPA projector
``norm``        per-channel scale/bias of a normalisation layer
``conv_h``/``conv_w``/``conv_in``/``conv_out``  convolution kernel axes (HWIO)
``layers``      the stacked axis of scanned blocks
==============  =====================================================================
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

# The input normalisation of the ImageNet-trained vision networks (DINOv2, the demo's
# feature net): (x − mean) / std per RGB channel, x in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def normal(stddev: float) -> Initializer:
  return nnx.initializers.normal(stddev)


def torch_linear_init(in_features: int) -> tuple[Initializer, Initializer]:
  """PyTorch's nn.Linear default: kaiming-uniform(a=√5) weight, U(±1/√fan_in) bias."""
  bound = 1.0 / (in_features ** 0.5)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init, init


def Dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
          rngs: nnx.Rngs, use_bias: bool = True,
          kernel_init: Initializer = xavier_uniform, bias_init: Initializer = zeros,
          dtype=None, param_dtype=jnp.float32, precision=None) -> nnx.Linear:
  """nnx.Linear whose kernel is named ``axes`` and whose bias is named ``(axes[1],)``."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      precision=precision,
      kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)),
      bias_init=nnx.with_partitioning(bias_init, (axes[1],)), rngs=rngs)


def Conv(in_features: int, out_features: int, kernel_size: int | Sequence[int], *,
         rngs: nnx.Rngs, strides: int | Sequence[int] = 1, padding="SAME",
         use_bias: bool = True, kernel_init: Initializer | None = None,
         bias_init: Initializer = zeros, dtype=None, param_dtype=jnp.float32,
         precision=None) -> nnx.Conv:
  """nnx.Conv (NHWC, HWIO kernel) with logical axis names on kernel and bias."""
  if kernel_init is None:
    kernel_init = nnx.initializers.lecun_normal()
  return nnx.Conv(
      in_features, out_features, kernel_size, strides=strides, padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
      kernel_init=nnx.with_partitioning(kernel_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(bias_init, ("conv_out",)), rngs=rngs)


def LayerNorm(dim: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6, use_bias: bool = True,
              use_scale: bool = True, dtype=None, param_dtype=jnp.float32) -> nnx.LayerNorm:
  """nnx.LayerNorm with named scale/bias (statistics in float32)."""
  return nnx.LayerNorm(
      dim, epsilon=epsilon, use_bias=use_bias, use_scale=use_scale, dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(ones, ("norm",)),
      bias_init=nnx.with_partitioning(zeros, ("norm",)), rngs=rngs)


def GroupNorm(dim: int, *, rngs: nnx.Rngs, num_groups: int = 32, epsilon: float = 1e-6,
              dtype=None, param_dtype=jnp.float32) -> nnx.GroupNorm:
  return nnx.GroupNorm(
      dim, num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(ones, ("norm",)),
      bias_init=nnx.with_partitioning(zeros, ("norm",)), rngs=rngs)


class RMSNorm(nnx.Module):
  """x · rsqrt(mean(x²) + eps) · w, statistics and scaling in float32, cast back.

  The weight multiplies in float32; the result is cast back to the input dtype.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def param_count(module: nnx.Module) -> int:
  return sum(int(v.size) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def unnamed_params(module: nnx.Module) -> list[str]:
  """Paths of parameters that carry no logical axis names (should be empty)."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    value = var.get_value()
    if names is None or len(names) != value.ndim:
      out.append("/".join(str(p) for p in path))
  return out
