"""User errors: one family for every mistake a user can fix.

A *user error* is something the person running sfd_jax can fix: a config field out of
range, a dataset that does not fit the model, a missing or corrupt file, a checkpoint that
cannot be resumed, a converter input of the wrong kind, a full disk or a read-only
directory. Everything else (a bug) is an *internal error*. The entry points print a user
error as one line and exit with status 2 (``core.runner``); config fields are checked
with ``core.options``.

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
from typing import Iterable


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


# ------------------------------------------------------------------ describing


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
