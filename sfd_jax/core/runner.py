"""The entry points' runner: a user error (``core.errors``) becomes one line, exit 2.

``main.py`` runs its absl main through ``run_main``, every ``python -m sfd_jax....``
command its argparse main through ``run_cli``. A user error is printed as **one line** on
stderr — what was wrong, the file or config field, what was expected, how to fix it — and
the process exits with status ``EXIT_CODE`` (2) without a traceback::

  main.py: config error: config.num_train_steps must be an integer > 0, got -5 ...

``--verbosity=1`` or ``SFD_JAX_TRACEBACK=1`` prints the traceback too. Internal errors
keep Python's traceback. Orbax / TensorStore failures that libraries report again from
their own threads, tasks and coroutines are dropped or shortened where they are reported
(the thread hook, the loggers and their handlers, the unraisable hook): their error log
records about a failed save are not shown at all (the one line reports it); nothing else
is filtered, and stderr is never rewritten.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

from sfd_jax.core.errors import (ConfigError, UserError, format_line, one_line, resource_errno,
                                 user_error)

TRACEBACK_ENV = "SFD_JAX_TRACEBACK"
EXIT_CODE = 2


def _strip_verbosity(argv: list[str]) -> list[str]:
  """Removes ``--verbosity=N`` / ``-v N`` (absl style) and turns tracebacks on for N >= 1."""
  out, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
      continue
    value = None
    if arg.startswith("--verbosity="):
      value = arg.split("=", 1)[1]
    elif arg in ("--verbosity", "-v") and i + 1 < len(argv):
      value, skip = argv[i + 1], True
    if value is None:
      out.append(arg)
      continue
    try:
      if int(value) >= 1:
        os.environ[TRACEBACK_ENV] = "1"
    except ValueError:
      out.append(arg)
  return out


def traceback_requested() -> bool:
  """``SFD_JAX_TRACEBACK`` set (not 0/false), or absl ``--verbosity`` >= 1."""
  env = os.environ.get(TRACEBACK_ENV, "").strip().lower()
  if env and env not in ("0", "false", "no", "off"):
    return True
  try:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if flags.FLAGS.is_parsed():
      return int(flags.FLAGS["verbosity"].value) >= 1
  except Exception:  # pylint: disable=broad-except
    pass
  before = len(os.environ.get(TRACEBACK_ENV, ""))
  _strip_verbosity(list(sys.argv[1:]))     # flags not parsed (yet): read the command line
  return len(os.environ.get(TRACEBACK_ENV, "")) > before


def _silence_shutdown() -> None:
  """After the error line the interpreter's shutdown prints nothing more: background
  threads (Orbax, TensorStore, Grain) that fail once the interpreter stops write to a
  closed-off stderr, and a shutdown that hangs on such a thread ends after 60 s."""
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None
  logging.disable(logging.CRITICAL)
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.dup2(devnull, 1)
  except OSError:
    pass
  timer = threading.Timer(60.0, os._exit, (EXIT_CODE,))  # pylint: disable=protected-access
  timer.daemon = True
  timer.start()


def report(prog: str, err: UserError, exc: BaseException | None = None) -> None:
  """Prints the one line (and the traceback when requested) and exits with EXIT_CODE."""
  verbose = traceback_requested()
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  if verbose and exc is not None:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  sys.stderr.write(format_line(prog, err) + "\n")
  sys.stderr.flush()
  if not verbose:
    _silence_shutdown()
  sys.exit(EXIT_CODE)


def program_name(argv0: str | None = None) -> str:
  """How the user ran us: ``main.py``, ``sfd-jax``, or ``python -m sfd_jax.x.y`` for a
  package module (``python -m sfd_jax`` for the package's ``__main__.py``)."""
  argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
  if not argv0:
    return "sfd_jax"
  pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../sfd_jax
  path = os.path.abspath(argv0)
  if path.endswith(".py") and path.startswith(pkg + os.sep):
    rel = os.path.relpath(path[:-3], os.path.dirname(pkg)).replace(os.sep, ".")
    return f"python -m {rel.removesuffix('.__main__')}"
  return os.path.basename(argv0)


def guard(fn: Callable, prog: str | None = None) -> Callable:
  """``fn`` with user errors reported as one line (see ``report``)."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt):
      raise
    except BaseException as e:  # pylint: disable=broad-except
      err = user_error(e)
      if err is None:
        raise
      report(prog or program_name(), err, e)
  wrapped.__name__ = getattr(fn, "__name__", "main")
  wrapped.__doc__ = getattr(fn, "__doc__", None)
  return wrapped


# ------------------------------------------------------------------ library reports

_LIBRARIES = ("orbax", "tensorstore")


def _raised_in_library(exc) -> bool:
  tb = getattr(exc, "__traceback__", None)
  while tb is not None:
    if any(lib in tb.tb_frame.f_code.co_filename for lib in _LIBRARIES):
      return True
    tb = tb.tb_next
  return False


# What Orbax / TensorStore log when a save fails (its threads, the commit, the finalize
# step): the failure reaches the caller, which reports it as its one line (or, for a bug,
# with its traceback).
_FAILED_SAVE = re.compile(
    r"_SignalingThread\.run\(\) raised|Handler Commit operations|Commit callback|"
    r"Save Finalize thread|background save thread|Error writing|Failed writing|"
    r"RESOURCE_EXHAUSTED|OUT_OF_RANGE|No space left|File too large|Disk quota|Read-only file "
    r"system|Permission denied|PERMISSION_DENIED", re.I)


def _failed_save(msg: str, exc) -> bool:
  if _FAILED_SAVE.search(msg or ""):
    return True
  return exc is not None and (_FAILED_SAVE.search(str(exc)) is not None
                              or resource_errno(exc) is not None)


class _OneLineLibraryErrors(logging.Filter):
  """ERROR records logged by Orbax / TensorStore, or carrying an exception raised inside
  them (asyncio's "Task exception was never retrieved" for a failed Orbax write, logged
  whenever the task is collected): those about a failed save are dropped — the entry
  point reports the failure itself, once, in its line — and the others keep their first
  line and lose the traceback. Attached to the loggers and their handlers; stderr itself
  is never rewritten (``--verbosity=1`` keeps every record)."""

  def filter(self, record) -> bool:
    path = getattr(record, "pathname", "") or ""
    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno >= logging.ERROR and (
        any(lib in path for lib in _LIBRARIES) or _raised_in_library(exc)):
      try:
        msg = record.getMessage()
      except Exception:  # pylint: disable=broad-except
        msg = str(record.msg)
      if _failed_save(msg, exc):
        return False
      first = msg.splitlines()[0] if msg else ""
      record.msg, record.args = (first[:300] + ("..." if len(first) > 300 else "")), ()
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _closed_loop(exc) -> bool:
  """An asyncio callback scheduled into an event loop that has closed: after a failed
  save, TensorStore's threads hand Orbax's write results to its finished loop as they
  wind down, and report each refusal as an unraisable exception."""
  tb = getattr(exc, "__traceback__", None)
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (isinstance(exc, RuntimeError) and tb is not None
          and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))


def _quiet_unraisable(previous):
  """A ``sys.unraisablehook`` that drops the reports of exceptions raised inside Orbax /
  TensorStore (a failed restore leaves its read coroutines to the garbage collector,
  which reports each one) and of ``_closed_loop`` refusals; everything else goes to
  ``previous``."""
  def hook(unraisable):
    if not (_raised_in_library(unraisable.exc_value) or _closed_loop(unraisable.exc_value)):
      previous(unraisable)
  return hook


def _quiet_thread_errors(previous):
  """A ``threading.excepthook`` that drops exceptions raised inside Orbax / TensorStore
  threads (their failure reaches the caller, which reports it)."""
  def hook(args):
    if not _raised_in_library(args.exc_value):
      previous(args)
  return hook


def _quiet_library_reports() -> None:
  if traceback_requested() or getattr(sys.unraisablehook, "_sfd_quiet", False):
    return
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  sys.unraisablehook._sfd_quiet = True  # pylint: disable=protected-access
  threading.excepthook = _quiet_thread_errors(threading.excepthook)
  flt = _OneLineLibraryErrors()
  for logger in (logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")):
    logger.addFilter(flt)
    for handler in logger.handlers:
      handler.addFilter(flt)
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.get_absl_handler().addFilter(flt)


# ------------------------------------------------------------------ absl apps


def _overrides(argv: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
  """(``config.a.b``, value) of the ``--config.a.b=value`` arguments."""
  out = []
  for i, arg in enumerate(argv):
    for name in names:
      for dashes in ("--", "-"):
        if arg.startswith(f"{dashes}{name}."):
          key, eq, value = arg[len(dashes):].partition("=")
          if not eq and i + 1 < len(argv):
            value = argv[i + 1]
          out.append((key, value))
  return out


def _flag_arg(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return lines[-1] if lines else str(text)


def flag_error_line(exc: BaseException, argv: Sequence[str],
                    config_flags: Sequence[str] = ("config",)) -> ConfigError:
  """A ``ConfigError`` for an exception raised while parsing the command line
  (``config_flags``: the names of the app's config-file flags)."""
  text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
  key = None
  m = re.search(r"'\\?'?([A-Za-z_][\w]*)\\?'?'", text) or re.search(r"'([^'\s]+)'", text)
  if m:
    key = m.group(1)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  overrides = _overrides(argv, config_flags)
  if isinstance(exc, (KeyError, AttributeError)) and key:
    culprit = next((o for o in overrides if key in o[0].split(".")), None)
    if culprit is not None:
      field, _ = culprit
      parts = field.split(".")
      parent = ".".join(parts[:parts.index(key)])
      hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ""
      return ConfigError(
          f"--{field}: the config has no field '{key}' under '{parent}'{hint}; check the "
          f"spelling against the config file given with --{parts[0]}")
  # A config file that cannot be loaded, or whose get_config() failed.
  for name in config_flags:
    path = _flag_arg(argv, name)
    if path and ("config file" in text or "get_config" in text or isinstance(exc, OSError)):
      return ConfigError(f"--{name}={path}: cannot load the config file ({_last_line(text)}); "
                         "give the path of a config file (e.g. configs/sfd_xl.py) with valid "
                         "options after ':'")
  # absl's own errors (a value of the wrong type, an unknown flag, a missing flag).
  detail = one_line(text)
  for field, value in overrides:
    if field in text:
      detail = re.sub(r"^flag --\S+?: ", "", detail)
      return ConfigError(f"--{field}={value}: {detail}")
  return ConfigError(f"{detail} (see --help)")


def check_config_flags(flag_values, config_flags: Sequence[str], argv: Sequence[str]) -> None:
  """Raises ``ConfigError`` for a config flag whose file could not be loaded:
  ml_collections defers that error until the config is first used, so it is used here."""
  for name in config_flags:
    try:
      flag_values[name].value.keys()
    except IOError as e:
      cause = e.__cause__ if e.__cause__ is not None else e
      raise ConfigError(f"--{name}={_flag_arg(argv, name) or '?'}: cannot load the config "
                        f"file ({_last_line(str(cause))}); give the path of a config file "
                        "(e.g. configs/sfd_xl.py)") from e
    except AttributeError:   # not set (None): absl reports the missing flag
      pass


def run_main(main: Callable, argv: Sequence[str] | None = None,
             config_flags: Sequence[str] = ("config",)) -> None:
  """``absl.app.run(main, argv)`` with one-line user errors and flag errors (exit 2);
  ``config_flags``: the names of the app's ml_collections config-file flags."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  prog = program_name(argv[0] if argv else None)

  def parse(args):
    try:
      rest = flags.FLAGS(list(args))
      check_config_flags(flags.FLAGS, config_flags, args)
      return rest
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      report(prog, user_error(e) or flag_error_line(e, args, config_flags), e)
    return []  # unreachable

  _quiet_library_reports()
  app.run(guard(main, prog), argv=argv, flags_parser=parse)


# ------------------------------------------------------------------ argparse commands


class ArgumentParser(argparse.ArgumentParser):
  """argparse with usage mistakes as one line (``prog: usage error: ... (see --help)``,
  exit 2) instead of the usage block."""

  def error(self, message):  # noqa: D401
    self.exit(EXIT_CODE, f"{self.prog}: usage error: {one_line(message)} (see --help)\n")


def run_cli(main: Callable[[list[str] | None], Any], prog: str | None = None,
            argv: Sequence[str] | None = None) -> None:
  """Runs an argparse ``main(argv)`` as a command: exit status 0 (or main's int), user
  errors as one line with status 2 (``--verbosity=1`` or SFD_JAX_TRACEBACK=1: with the
  traceback)."""
  args = _strip_verbosity(list(sys.argv[1:] if argv is None else argv))
  _quiet_library_reports()
  rc = guard(main, prog or program_name())(args)
  sys.exit(rc if isinstance(rc, int) and not isinstance(rc, bool) else 0)
