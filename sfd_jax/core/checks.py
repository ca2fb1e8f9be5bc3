"""Checks of config fields before anything is built: ``check_fields(config, rules)``
raises a ``ConfigError`` naming the field, what it must be and what it is::

  config.num_train_steps must be an integer > 0, got -5

A rule is ``(field, ok, expected[, hint])``; the predicates below are the common ``ok``s.
A field the config does not have is skipped (the code's default applies).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from sfd_jax.core.errors import ConfigError


def field_value(config, field: str):
  """``config.a.b`` for ``field="a.b"`` (``KeyError`` when a part is missing)."""
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def check_field(config, field: str, ok: Callable[[Any], bool], expected: str, *,
                hint: str = "", prefix: str = "config") -> Any:
  """Returns ``config.<field>``; raises ``ConfigError`` unless ``ok(value)``.

  The message reads ``config.<field> must be <expected>, got <value>[; <hint>]``. A field
  the config does not have is skipped (returns None): the code's default applies.
  """
  try:
    value = field_value(config, field)
  except (KeyError, AttributeError, TypeError):
    return None
  try:
    good = bool(ok(value))
  except (TypeError, ValueError):
    good = False
  if not good:
    raise ConfigError(f"{prefix}.{field} must be {expected}, got {value!r}"
                      + (f"; {hint}" if hint else ""))
  return value


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v) -> bool:
  return _is_int(v) and v > 0


def non_negative_int(v) -> bool:
  return _is_int(v) and v >= 0


def positive_number(v) -> bool:
  return _is_number(v) and v > 0 and v == v and v != float("inf")


def non_negative_number(v) -> bool:
  return _is_number(v) and v >= 0 and v == v and v != float("inf")


def in_range(lo: float, hi: float) -> Callable[[Any], bool]:
  return lambda v: _is_number(v) and lo <= v <= hi


def one_of(choices: Iterable[Any]) -> Callable[[Any], bool]:
  choices = tuple(choices)
  return lambda v: v in choices


def require_sections(config, sections: Sequence[str], *, mode: str, example: str) -> None:
  """``ConfigError`` when the config lacks a section that ``--mode=<mode>`` reads (the
  config file of another mode)."""
  missing = [s for s in sections if not _has(config, s)]
  if missing:
    raise ConfigError(f"the config has no {', '.join('config.' + m for m in missing)} "
                      f"section, which --mode={mode} needs: the --config file is not one "
                      f"for this mode; use one written for it (e.g. {example})")


def _has(config, field: str) -> bool:
  try:
    field_value(config, field)
    return True
  except (KeyError, AttributeError, TypeError):
    return False


def check_fields(config, rules: Sequence[tuple], *, prefix: str = "config") -> None:
  """``check_field`` for each ``(field, ok, expected[, hint])`` of ``rules``."""
  for rule in rules:
    field, ok, expected = rule[:3]
    check_field(config, field, ok, expected, hint=rule[3] if len(rule) > 3 else "",
                prefix=prefix)
