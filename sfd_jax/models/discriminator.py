"""PatchGAN discriminator of the texture VAE's GAN loss (taming ``NLayerDiscriminator``).

Pix2Pix's PatchGAN as taming-transformers builds it (``taming/modules/discriminator/
model.py``, used by the LDM / VA-VAE ``LPIPSWithDiscriminator``), NHWC here:

  conv4×4 s2 p1 (bias) → LeakyReLU(0.2)
  n_layers − 1 times: conv4×4 s2 p1 (no bias) → BatchNorm → LeakyReLU(0.2), width ×2 (≤ 8·ndf)
  conv4×4 s1 p1 (no bias) → BatchNorm → LeakyReLU(0.2)
  conv4×4 s1 p1 (bias) → one logit per patch

For 3 layers, ndf 64 and a 64-pixel input the maps are 64 → 32 → 16 → 8 → 7 → 6.

``BatchNorm`` is PyTorch's ``BatchNorm2d`` exactly (Flax's differs in two places): in
training mode it normalises with the *batch* statistics (mean and biased variance over
N, H, W; eps 1e-5) and updates its running statistics with momentum 0.1 and the
*unbiased* variance, running = 0.9·running + 0.1·batch; in evaluation mode
(``use_running_average``) it uses the running statistics. The reference trains the
discriminator (and uses it in the generator's loss) in training mode only, so the
running statistics are carried along and checkpointed but never used in training. They
are ``nnx.BatchStat`` variables (``mean``, ``var`` and the ``count`` of updates, torch's
``num_batches_tracked``), the trainer's ``disc_stats`` state entry.

Initialisation (taming ``weights_init``): convolution kernels N(0, 0.02²), BatchNorm
scales N(1, 0.02²) and biases 0; the two biased convolutions keep PyTorch's default
U(±1/√fan_in) bias.

Parameter names: ``convs[i]`` is the i-th convolution, ``norms[j]`` the j-th BatchNorm;
``torch_index`` gives the reference's ``main.<index>`` of each (``sfd_jax.convert.
discriminator``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """``NLayerDiscriminator(input_nc, ndf, n_layers)`` (taming's defaults: 3, 64, 3)."""
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  leaky_slope: float = 0.2
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1    # PyTorch convention: weight of the new batch statistic

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f"DiscriminatorConfig.n_layers must be >= 1, got {self.n_layers}")

  def widths(self) -> list[tuple[int, int, int, bool]]:
    """(in, out, stride, has_bias) of every convolution."""
    out = [(self.in_channels, self.ndf, 2, True)]
    mult = 1
    for n in range(1, self.n_layers):
      prev, mult = mult, min(2 ** n, 8)
      out.append((self.ndf * prev, self.ndf * mult, 2, False))
    prev, mult = mult, min(2 ** self.n_layers, 8)
    out.append((self.ndf * prev, self.ndf * mult, 1, False))
    out.append((self.ndf * mult, 1, 1, True))
    return out

  def torch_index(self) -> tuple[list[int], list[int]]:
    """``main.<i>`` indices of the convolutions and of the BatchNorms in the reference."""
    n = self.n_layers
    convs = [0] + [3 * k - 1 for k in range(1, n + 1)] + [3 * n + 2]
    norms = [3 * k for k in range(1, n + 1)]
    return convs, norms

  def output_size(self, size: int) -> int:
    """Side of the logit map for an input side ``size``."""
    for _, _, stride, _ in self.widths():
      size = (size + 2 - 4) // stride + 1
    return size


class BatchNorm(nnx.Module):
  """PyTorch ``BatchNorm2d`` over the last axis (NHWC), see the module docstring."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.eps, self.momentum = float(eps), float(momentum)
    self.use_running_average = False
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (num_features,),
                                                          param_dtype),
                           out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32), out_sharding=())

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    running = self.use_running_average if use_running_average is None else use_running_average
    xf = x.astype(jnp.float32)
    if running:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)          # biased: normalisation
      n = xf.size // xf.shape[-1]
      unbiased = var * (n / max(n - 1, 1))                        # unbiased: running stat
      m = self.momentum
      # set_value replaces the arrays (item assignment would write into a NumPy buffer)
      self.mean.set_value((1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean))
      self.var.set_value((1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased))
      self.count.set_value(self.count[...] + 1)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def _conv_init(key, shape, dtype=jnp.float32):
  return 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nnx.Module):
  """PatchGAN: NHWC images → NHWC logits [B, h, w, 1] (see the module docstring)."""

  def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig(), *,
               rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.config = config
    convs = []
    for cin, cout, stride, bias in config.widths():
      _, bias_init = layers.torch_linear_init(cin * 16)
      convs.append(layers.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                               use_bias=bias, kernel_init=_conv_init, bias_init=bias_init,
                               rngs=rngs, dtype=dtype, param_dtype=param_dtype))
    self.convs = nnx.List(convs)
    self.norms = nnx.List([
        BatchNorm(cout, eps=config.bn_eps, momentum=config.bn_momentum, rngs=rngs,
                  param_dtype=param_dtype)
        for _, cout, _, _ in config.widths()[1:-1]])

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    slope = self.config.leaky_slope
    h = jax.nn.leaky_relu(self.convs[0](x), slope)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      h = jax.nn.leaky_relu(norm(conv(h), use_running_average), slope)
    return self.convs[-1](h).astype(jnp.float32)



def functional(model: NLayerDiscriminator):
  """``(apply, params, stats)`` of a discriminator module, for use inside transforms.

  ``apply(params, stats, x, use_running_average=False) -> (logits, new_stats)`` merges
  pure-dict params and statistics into a fresh module, so it can run under ``jax.vjp``
  / ``jax.grad`` without mutating ``model``.
  """
  graphdef, params_state, stats_state = nnx.split(model, nnx.Param, nnx.BatchStat)

  def apply(params, stats, x, use_running_average: bool = False):
    p = jax.tree.map(lambda v: v, params_state)
    s = jax.tree.map(lambda v: v, stats_state)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, stats)
    m = nnx.merge(graphdef, p, s)
    logits = m(x, use_running_average=use_running_average)
    return logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

  return apply, nnx.to_pure_dict(params_state), nnx.to_pure_dict(stats_state)
