"""Jitted functions with XLA compiler options from a config section, compiled once per
(function, options) in a process."""
from __future__ import annotations

import functools
from typing import Any

import jax


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
