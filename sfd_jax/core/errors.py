"""User errors: one family for every mistake a user can fix, and one way to report them.

A *user error* is something the person running sfd_jax can fix: a config field out of
range, a dataset that does not fit the model, a missing or corrupt file, a checkpoint that
cannot be resumed, a converter input of the wrong kind, a full disk or a read-only
directory. Everything else (a bug) is an *internal error*.

The entry points — ``main.py`` and every ``python -m sfd_jax....`` command — run their main
function through ``run_main`` (absl apps) or ``run_cli`` (argparse commands). A user error
is printed as **one line** on stderr, naming what was wrong, the file or config field, what
was expected and how to fix it, and the process exits with status ``EXIT_CODE`` (2)
without a traceback::

  main.py: config error: config.num_train_steps must be an integer > 0, got -5 ...

``--verbosity=1`` (absl apps) or the environment variable ``SFD_JAX_TRACEBACK=1`` (every
entry point) prints the traceback too. Internal errors keep Python's traceback.

The family (all ``ValueError``s; file errors are also the matching ``OSError``)::

  UserError
  ├── ConfigError          config fields, flags, option combinations
  ├── DataError            datasets, statistics, reference batches, records
  ├── CheckpointError      training checkpoints and converted weight folders
  ├── ConverterInputError  inputs of the converters (sfd_jax.convert.*)
  ├── ResourceError        disk full, permission denied, read-only file system
  ├── MissingFileError     (also FileNotFoundError) a named input does not exist
  └── OutputExistsError    (also FileExistsError) an output would be overwritten

Parts raise these (or their own subclasses: ``ShardingError``, ``DataFormatError``,
``ConversionError``, ``SamplingError``, ``ExportError``, ...); this module imports nothing
from the package.
"""
from __future__ import annotations

import errno
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

TRACEBACK_ENV = "SFD_JAX_TRACEBACK"
EXIT_CODE = 2


class UserError(ValueError):
  """A mistake the user can fix; printed as one line by the entry points (exit 2)."""
  kind = "error"

  def __str__(self) -> str:   # also for the KeyError / OSError mixins: the plain message
    if len(self.args) == 1:
      return str(self.args[0])
    return BaseException.__str__(self)


class ConfigError(UserError):
  """A config field (or flag) is wrong: out of range, of the wrong type, inconsistent."""
  kind = "config error"


class DataError(UserError):
  """A dataset, statistics file, reference batch or record is wrong for this run."""
  kind = "data error"


class CheckpointError(UserError):
  """A checkpoint (training run or converted weights) cannot be used as asked."""
  kind = "checkpoint error"


class ConverterInputError(UserError):
  """An input of a converter does not hold what the converter expects."""
  kind = "converter input error"


class ResourceError(UserError):
  """The file system refused: no space, a quota, permissions, a read-only mount."""
  kind = "resource error"


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named does not exist."""
  kind = "file not found"


class OutputExistsError(UserError, FileExistsError):
  """An output would overwrite earlier results."""
  kind = "output exists"


class MissingKeyError(DataError, KeyError):
  """A file lacks an entry it must have (also a ``KeyError``)."""


# ------------------------------------------------------------------ config checks


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


# ------------------------------------------------------------------ resources

_RESOURCE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EFBIG: ("file too large for the file system or the file-size limit",
                  "raise the file-size limit (ulimit -f) or free space"),
    errno.EACCES: ("permission denied", "make it writable for this user"),
    errno.EPERM: ("operation not permitted", "make it writable for this user"),
    errno.EROFS: ("read-only file system", "use a writable location"),
}
_RESOURCE_TEXT = [
    (re.compile(r"no space left on device", re.I), errno.ENOSPC),
    (re.compile(r"disk quota exceeded", re.I), errno.EDQUOT),
    (re.compile(r"file too large", re.I), errno.EFBIG),
    (re.compile(r"read-only file system", re.I), errno.EROFS),
    (re.compile(r"permission denied|PERMISSION_DENIED", re.I), errno.EACCES),
]
_PATH_IN_TEXT = re.compile(r"""["'](/[^"']+)["']|(?<![\w.])(/[^\s"':,\]\[]+)""")


def _chain(exc: BaseException | None) -> Iterable[BaseException]:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def resource_errno(exc: BaseException) -> tuple[int, str | None] | None:
  """(errno, path or None) when ``exc`` (or its cause) is a disk-full / permission /
  read-only error — raised by Python, or by TensorStore / TensorFlow as text."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _RESOURCE_ERRNOS:
      return e.errno, e.filename if isinstance(e.filename, str) else None
  for e in _chain(exc):
    text = str(e)
    for pattern, code in _RESOURCE_TEXT:
      if pattern.search(text):
        m = _PATH_IN_TEXT.search(text)
        return code, ((m.group(1) or m.group(2)) if m else None)
  return None


def as_resource_error(exc: BaseException, *, where: str = "",
                      keeps: str = "") -> ResourceError | None:
  """A one-line ``ResourceError`` for a disk-full / permission error, else None.

  ``where``: the directory being written (when the error does not name it); ``keeps``:
  what is still intact (e.g. "the checkpoints up to step 10 are intact").
  """
  if isinstance(exc, ResourceError):
    return exc
  found = resource_errno(exc)
  if found is None:
    return None
  code, path = found
  what, fix = _RESOURCE_ERRNOS[code]
  verb = "cannot access" if code in (errno.EACCES, errno.EPERM) else "cannot write to"
  target = where or path or "a file"
  at = f" (at {path})" if path and where and path.rstrip("/") != where.rstrip("/") else ""
  msg = (f"{verb} {target}: {what} [{errno.errorcode.get(code, code)}]{at}; "
         f"{fix} and rerun the same command")
  if keeps:
    msg += f" ({keeps})"
  return ResourceError(msg)


def check_writable(directory: str, what: str = "the output directory") -> None:
  """Creates ``directory`` if needed and checks that a file can be written there.

  Raises ``ResourceError`` (permission, read-only, full) or ``ConfigError`` (a path
  component is a file) naming the directory.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(directory)
  probe = path / f".sfd_jax_write_test.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except (FileExistsError, NotADirectoryError) as e:
    raise ConfigError(f"{what} {directory} cannot be created: a part of the path is a "
                      "file, not a directory; choose another path") from e
  except Exception as e:  # pylint: disable=broad-except
    found = resource_errno(e)
    if found is None:
      raise
    text, fix = _RESOURCE_ERRNOS[found[0]]
    raise ResourceError(f"{what} {directory} is not writable: {text} "
                        f"[{errno.errorcode.get(found[0], found[0])}]; {fix} (or choose "
                        "another one) and rerun the same command; nothing in it was "
                        "changed") from e


# ------------------------------------------------------------------ reporting


def user_error(exc: BaseException) -> UserError | None:
  """The user error ``exc`` stands for (itself, one in its cause chain, or a resource
  error), else None (an internal error)."""
  e, seen = exc, set()
  while e is not None and id(e) not in seen:   # explicit causes only (``raise ... from``):
    seen.add(id(e))                            # a bug while handling a user error stays a bug
    if isinstance(e, UserError):
      return e
    e = e.__cause__
  return as_resource_error(exc)


def one_line(text: str) -> str:
  """Whitespace (newlines included) collapsed to single spaces."""
  return " ".join(str(text).split())


def format_line(prog: str, err: UserError) -> str:
  return f"{prog}: {err.kind}: {one_line(str(err))}"


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
  """After the error line, the interpreter's shutdown must print nothing more: background
  threads (Orbax, TensorStore, Grain) that fail once the interpreter stops ("cannot
  schedule new futures after interpreter shutdown") write to a closed-off stderr."""
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None
  try:
    import logging  # pylint: disable=import-outside-toplevel
    logging.disable(logging.CRITICAL)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.dup2(devnull, 1)
  except OSError:
    pass
  # A hung shutdown (a non-daemon thread that never ends) must not keep the process.
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


def _prog(argv0: str | None = None) -> str:
  """How the user ran us: ``main.py``, or ``python -m sfd_jax.x.y`` for a package module."""
  argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
  if not argv0:
    return "sfd_jax"
  pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../sfd_jax
  path = os.path.abspath(argv0)
  if path.endswith(".py") and path.startswith(pkg + os.sep):
    rel = os.path.relpath(path[:-3], os.path.dirname(pkg)).replace(os.sep, ".")
    return f"python -m {rel}"
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
      report(prog or _prog(), err, e)
  wrapped.__name__ = getattr(fn, "__name__", "main")
  wrapped.__doc__ = getattr(fn, "__doc__", None)
  return wrapped


# ------------------------------------------------------------------ library noise

# Tracebacks that background threads of Orbax / TensorStore print when an operation
# fails or the interpreter stops; they carry no information beyond the error itself.
NOISE = ("RuntimeError: Event loop is closed",
         "RuntimeError: cannot schedule new futures after interpreter shutdown",
         "RuntimeError: cannot schedule new futures after shutdown")


class _QuietStream:
  """A stderr wrapper that drops whole traceback blocks ending in one of ``NOISE``
  (buffered per thread; everything else passes through unchanged)."""

  def __init__(self, stream):
    self._stream = stream
    self._lock = threading.Lock()
    self._blocks: dict[int, list[str]] = {}
    self._partial: dict[int, str] = {}

  def __getattr__(self, name):
    return getattr(self._stream, name)

  def _emit(self, text: str) -> None:
    self._stream.write(text)

  def write(self, text: str) -> int:
    tid = threading.get_ident()
    with self._lock:
      data = self._partial.pop(tid, "") + text
      lines = data.splitlines(keepends=True)
      if lines and not lines[-1].endswith("\n"):
        if tid in self._blocks or lines[-1].startswith("Traceback"):
          self._partial[tid] = lines.pop()
      for line in lines:
        block = self._blocks.get(tid)
        if block is None:
          if line.startswith("Traceback (most recent call last)"):
            self._blocks[tid] = [line]
          else:
            self._emit(line)
          continue
        block.append(line)
        bare = line.rstrip("\n")
        if (bare and not bare[0].isspace() and not bare.startswith("Traceback")
            and not bare.startswith(("During handling", "The above exception"))):
          del self._blocks[tid]          # the exception line ends the block
          if not any(bare.startswith(n) for n in NOISE):
            self._emit("".join(block))
        elif len(block) > 400:           # not a traceback after all
          del self._blocks[tid]
          self._emit("".join(block))
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def flush_pending(self) -> None:
    """Writes what is still buffered (an unfinished block is never lost)."""
    with self._lock:
      for tid in list(self._blocks):
        self._emit("".join(self._blocks.pop(tid)))
      for tid in list(self._partial):
        self._emit(self._partial.pop(tid))
      self._stream.flush()


_LIBRARIES = ("orbax", "tensorstore")


def _library_file(path: str) -> bool:
  return any(lib in path for lib in _LIBRARIES)


def _raised_in_library(exc) -> bool:
  tb = getattr(exc, "__traceback__", None)
  while tb is not None:
    if _library_file(tb.tb_frame.f_code.co_filename):
      return True
    tb = tb.tb_next
  return False


def _from_library(record) -> bool:
  """The record was logged by Orbax / TensorStore, or carries an exception raised inside
  them (asyncio's "Task exception was never retrieved" for a failed Orbax write task is
  logged from asyncio itself, some time later, whenever the task is collected)."""
  return (_library_file(getattr(record, "pathname", "") or "")
          or _raised_in_library(record.exc_info[1] if record.exc_info else None))


def _quiet_unraisable(previous):
  """A ``sys.unraisablehook`` that drops "Exception ignored in: <coroutine ...>" reports
  for exceptions raised inside Orbax / TensorStore (a failed restore leaves its read
  coroutines to the garbage collector, which prints a traceback for each array; the entry
  point reports the error itself, once). Everything else goes to ``previous``."""
  def hook(unraisable):
    if _raised_in_library(unraisable.exc_value):
      return
    previous(unraisable)
  return hook


class _OneLineLibraryErrors:
  """A logging filter: ERROR records of Orbax / TensorStore (or with an exception raised
  inside them) keep their first line and lose their traceback (the entry point reports
  the error itself, once)."""

  def filter(self, record) -> bool:
    if record.levelno >= 40 and _from_library(record):
      try:
        msg = record.getMessage()
      except Exception:  # pylint: disable=broad-except
        msg = str(record.msg)
      first = msg.splitlines()[0] if msg else ""
      record.msg, record.args = (first[:300] + ("..." if len(first) > 300 else "")), ()
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def quiet_library_noise() -> None:
  """Installs the stderr and logging filters above (not when tracebacks are requested)."""
  if traceback_requested() or isinstance(sys.stderr, _QuietStream):
    return
  import atexit  # pylint: disable=import-outside-toplevel
  sys.stderr = _QuietStream(sys.stderr)
  atexit.register(sys.stderr.flush_pending)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  import logging  # pylint: disable=import-outside-toplevel
  flt = _OneLineLibraryErrors()
  for logger in (logging.getLogger(), logging.getLogger("absl")):
    logger.addFilter(flt)
    for handler in logger.handlers:
      handler.addFilter(flt)
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.get_absl_handler().addFilter(flt)
  except Exception:  # pylint: disable=broad-except
    pass


# ------------------------------------------------------------------ absl apps


def _config_flag_names(flag_values) -> list[str]:
  out = []
  for name, flag in flag_values._flags().items():  # pylint: disable=protected-access
    if name == getattr(flag, "name", None) and type(flag).__name__ == "_ConfigFlag":
      out.append(name)
  return out


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


def _config_path_arg(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return lines[-1] if lines else str(text)


def flag_error_line(exc: BaseException, argv: Sequence[str], flag_values=None) -> ConfigError:
  """A ``ConfigError`` for an exception raised while parsing the command line."""
  if flag_values is None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flag_values = flags.FLAGS
  names = _config_flag_names(flag_values) or ["config"]
  text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
  key = None
  m = re.search(r"'\\?'?([A-Za-z_][\w]*)\\?'?'", text) or re.search(r"'([^'\s]+)'", text)
  if m:
    key = m.group(1)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  overrides = _overrides(argv, names)
  if isinstance(exc, (KeyError, AttributeError)) and key:
    culprit = next((o for o in overrides if key in o[0].split(".")), None)
    if culprit is not None:
      field, _ = culprit
      parts = field.split(".")
      parent = ".".join(parts[:parts.index(key)])
      hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ""
      cfg_name = field.split(".", 1)[0]
      return ConfigError(
          f"--{field}: the config has no field '{key}' under '{parent}'{hint}; check the "
          f"spelling against the config file given with --{cfg_name}")
  # A config file that cannot be loaded, or whose get_config() failed.
  for name in names:
    path = _config_path_arg(argv, name)
    if path and ("config file" in text or "get_config" in text or isinstance(exc, OSError)):
      detail = _last_line(text)
      return ConfigError(f"--{name}={path}: cannot load the config file ({detail}); give "
                         "the path of a config file (e.g. configs/sfd_xl.py) with valid "
                         "options after ':'")
  # absl's own errors (a value of the wrong type, an unknown flag, a missing flag).
  detail = one_line(text)
  for field, value in overrides:
    if field in text:
      detail = re.sub(r"^flag --\S+?: ", "", detail)
      return ConfigError(f"--{field}={value}: {detail}")
  return ConfigError(f"{detail} (see --helpshort)")


def check_config_flags(flag_values=None) -> None:
  """Raises ``ConfigError`` for a config flag whose file could not be loaded (absl's
  config flags defer that error until the config is first used)."""
  if flag_values is None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flag_values = flags.FLAGS
  for name in _config_flag_names(flag_values):
    value = flag_values[name].value
    if type(value).__name__ == "_ErrorConfig":
      err = object.__getattribute__(value, "_error")
      path = flag_values[name].serialize().split("=", 1)[-1] if flag_values[name].present \
          else "?"
      raise ConfigError(f"--{name}={path}: cannot load the config file "
                        f"({_last_line(str(err))}); give the path of a config file "
                        "(e.g. configs/sfd_xl.py)")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with every command-line mistake as one line (exit 2)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  prog = _prog(argv[0] if argv else None)
  try:
    rest = flags.FLAGS(list(argv))
    check_config_flags()
    return rest
  except (SystemExit, KeyboardInterrupt):
    raise
  except ConfigError as e:
    report(prog, e, e)
  except Exception as e:  # pylint: disable=broad-except
    if user_error(e) is not None:
      report(prog, user_error(e), e)
    report(prog, flag_error_line(e, argv), e)
  return []  # unreachable


def run_main(main: Callable, argv: Sequence[str] | None = None) -> None:
  """``absl.app.run(main, argv)`` with one-line user errors and flag errors (exit 2)."""
  from absl import app  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  prog = _prog(argv[0] if argv else None)
  quiet_library_noise()
  app.run(guard(main, prog), argv=argv, flags_parser=parse_flags)


# ------------------------------------------------------------------ argparse commands


try:
  import argparse as _argparse
except ImportError:  # pragma: no cover
  _argparse = None


class ArgumentParser(_argparse.ArgumentParser):
  """argparse with usage mistakes as one line (``prog: usage error: ... (see --help)``,
  exit 2) instead of the usage block."""

  def error(self, message):  # noqa: D401
    self.exit(EXIT_CODE, f"{self.prog}: usage error: {one_line(message)} (see --help)\n")


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


def run_cli(main: Callable[[list[str] | None], Any], prog: str | None = None,
            argv: Sequence[str] | None = None) -> None:
  """Runs an argparse ``main(argv)`` as a command: exit status 0 (or main's int), user
  errors as one line with status 2 (``--verbosity=1`` or SFD_JAX_TRACEBACK=1: with the
  traceback)."""
  args = _strip_verbosity(list(sys.argv[1:] if argv is None else argv))
  quiet_library_noise()
  rc = guard(main, prog or _prog())(args)
  sys.exit(rc if isinstance(rc, int) and not isinstance(rc, bool) else 0)


def reason(exc: BaseException, limit: int = 300) -> str:
  """A short one-line description of an exception from a library (for messages)."""
  text = str(exc) or type(exc).__name__
  for cut in (" [tensorstore_spec", "See full TensorStore details", " tensorstore_spec"):
    if cut in text:
      text = text.split(cut, 1)[0]
  text = one_line(text).rstrip(" .:;,")
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  name = type(exc).__name__
  return text if name in ("Exception", "ValueError") else f"{name}: {text}"


def describe_mapping(d: Mapping[str, Any], limit: int = 8) -> str:
  """``a=1, b=2, ...`` (at most ``limit`` items) for messages."""
  items = list(d.items())
  text = ", ".join(f"{k}={v!r}" for k, v in items[:limit])
  return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
