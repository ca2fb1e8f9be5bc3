"""Jitted functions with XLA compiler options from a config section, compiled once per
(function, options) in a process."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def compiler_options(section) -> tuple[tuple[str, Any], ...]:
  """``section.compiler_options`` (a dict of XLA options, e.g.
  ``{"xla_backend_optimization_level": 0}`` for fast compiles in CPU tests) as a
  hashable tuple; empty when absent."""
  opts = section.get("compiler_options") if hasattr(section, "get") else None
  if not opts:
    return ()
  opts = opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)
  return tuple(sorted(opts.items()))


@functools.lru_cache(maxsize=None)
def jitted(fn, static_argnums: tuple[int, ...] = (),
           options: tuple[tuple[str, Any], ...] = ()) -> Any:
  """``jax.jit(fn)`` with XLA ``options``, one jitted object per (fn, options) so
  that repeated jobs in one process reuse the compiled code."""
  return jax.jit(fn, static_argnums=static_argnums, compiler_options=dict(options) or None)


# XLA:CPU hands dots to YNNPACK fusions by default. For the inference programs (sampling
# with guidance, texture-VAE decoding) its Eigen path measured 25-30 % faster on the
# project's 2-core CPU at the benchmark sizes, while the train step was as fast or
# faster with YNNPACK (docs/benchmarks.md, "CPU: heads-major attention and Eigen dots
# for inference"). An empty fusion-type list turns the YNNPACK fusions off for one
# compilation.
CPU_INFERENCE_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.lru_cache(maxsize=None)
def _supported(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this XLA build accepts ``options`` (an option XLA dropped must not break a
  run: it is then left out)."""
  try:
    jax.jit(lambda a: a + 1, compiler_options=dict(options)).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def inference_options(options: tuple[tuple[str, Any], ...] = (),
                      backend: str | None = None) -> tuple[tuple[str, Any], ...]:
  """XLA options for a sampling/decoding program: ``options`` when given (a config's
  ``compiler_options``), else ``CPU_INFERENCE_OPTIONS`` on the CPU backend (when this XLA
  accepts them) and none elsewhere."""
  if options:
    return tuple(options)
  if (backend or jax.default_backend()) != "cpu" or not _supported(CPU_INFERENCE_OPTIONS):
    return ()
  return CPU_INFERENCE_OPTIONS
