"""Start-up checks across a config's sections: ``require_sections(config, sections, ...)``
refuses, in one line, a config file written for another mode (fields one at a time are
checked against their declarations by ``core.options``).
"""
from __future__ import annotations

from typing import Sequence

from sfd_jax.core.errors import ConfigError


def require_sections(config, sections: Sequence[str], *, mode: str, example: str) -> None:
  """``ConfigError`` when the config lacks a section that ``--mode=<mode>`` reads (the
  config file of another mode)."""
  missing = [s for s in sections if not _has(config, s)]
  if missing:
    raise ConfigError(f"the config has no {', '.join('config.' + m for m in missing)} "
                      f"section, which --mode={mode} needs: the --config file is not one "
                      f"for this mode; use one written for it (e.g. {example})")


def _has(config, field: str) -> bool:
  node = config
  try:
    for part in field.split("."):
      node = node[part]
    return True
  except (KeyError, AttributeError, TypeError):
    return False
