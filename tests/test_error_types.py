"""User errors are typed (docs/errors.md): a check about a config field, a file or a path
raises the ``core.errors.UserError`` family, never a bare ``ValueError`` / ``TypeError``
(which the entry points report as a bug, with a traceback).

Read with ``ast`` over every module of the package: a ``raise ValueError(...)`` /
``raise TypeError(...)`` (or of an exception class of the package that derives from them
without being a user error) whose message names a config field (``config.``, ``--config``,
``<section>.<field>``) or formats a path (a variable called path, file, directory, src,
dst, workdir, ...; a file name ending in .npz, .json, .safetensors, ...) is reported with
its line. Programming errors (a wrong argument of a library function) name neither and
stay ``ValueError``s.
"""
import ast
import pathlib
import re

from tests.conftest import REPO

PKG = REPO / "sfd_jax"
SECTIONS = ("model", "objective", "optimizer", "disc_optimizer", "data", "loss", "sample",
            "eval", "train_eval", "validation", "export", "encode", "extract", "job", "mesh",
            "demo", "schedule", "eval_tokenizer", "plan", "wandb")
FIELD = re.compile(r"(--?config[.=][\w.]*|\bconfig\.[a-z_][\w.]*|\b(" + "|".join(SECTIONS)
                   + r")\.[a-z_]+\b)")
FILE_NAME = re.compile(r"\.(npz|npy|json|safetensors|pt|pth|ckpt|array_record|png)\b")
PATH_NAME = re.compile(r"(^|_)(path|paths|dir|dirs|directory|file|files|filename|src|dst|"
                       r"workdir|root|folder|where|ckpt|ckdir)$")
BUILTIN = {"ValueError", "TypeError"}


def _untyped_classes(root: pathlib.Path) -> set[str]:
  """Exception classes of the package that derive from ValueError / TypeError (directly or
  through each other) but not from the user-error family."""
  bases: dict[str, set[str]] = {}
  for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ClassDef):
        names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                 if isinstance(b, (ast.Name, ast.Attribute))}
        bases.setdefault(node.name, set()).update(names)

  def untyped(name, seen=()):
    if name in BUILTIN:
      return True
    if name in seen or name not in bases or name in ("UserError",):
      return False
    own = bases[name]
    if any(b.endswith("Error") and b in _user_family(bases) for b in own):
      return False
    return any(untyped(b, seen + (name,)) for b in own)
  return {n for n in bases if untyped(n)} | BUILTIN


def _user_family(bases: dict[str, set[str]]) -> set[str]:
  family, grew = {"UserError"}, True
  while grew:
    grew = False
    for name, own in bases.items():
      if name not in family and own & family:
        family.add(name)
        grew = True
  return family


def _message_parts(node: ast.AST) -> tuple[str, list[str]]:
  """(the message's literal text, the names it formats)."""
  texts, names = [], []
  for n in ast.walk(node):
    if isinstance(n, ast.Constant) and isinstance(n.value, str):
      texts.append(n.value)
    elif isinstance(n, ast.FormattedValue):
      for m in ast.walk(n.value):
        if isinstance(m, ast.Name):
          names.append(m.id)
        elif isinstance(m, ast.Attribute):
          names.append(m.attr)
  return " ".join(texts), names


def _why(call: ast.Call) -> str | None:
  if not call.args:
    return None
  text, names = _message_parts(call.args[0])
  if FIELD.search(text):
    return f"names a config field ({FIELD.search(text).group(0)!r})"
  if FILE_NAME.search(text):
    return f"names a file ({FILE_NAME.search(text).group(0)!r})"
  pathy = [n for n in names if PATH_NAME.search(n)]
  if pathy:
    return f"formats a path ({', '.join(pathy)})"
  return None


def untyped_user_errors(root: pathlib.Path = PKG) -> list[str]:
  classes = _untyped_classes(root)
  found = []
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
        continue
      func = node.exc.func
      name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
      if name not in classes:
        continue
      why = _why(node.exc)
      if why:
        found.append(f"{path.relative_to(root.parent)}:{node.lineno}: raise {name}(...) {why}")
  return found


def test_user_errors_are_typed():
  found = untyped_user_errors()
  assert not found, ("a check about a config field, a file or a path must raise the "
                     "user-error family (sfd_jax.core.errors), not:\n" + "\n".join(found))


def test_the_scan_finds_what_it_looks_for(tmp_path):
  """The scan itself: each kind of untyped user error is reported, typed ones are not."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "m.py").write_text(
      "class MyError(ValueError):\n  pass\n"
      "def f(path, n, config):\n"
      "  raise ValueError(f'config.model.depth={n} must be > 0')\n"       # 4: a field
      "  raise TypeError(f'cannot read {path}')\n"                         # 5: a path
      "  raise MyError('data.vf_features is empty')\n"                     # 6: own class
      "  raise ValueError('bad stats.npz')\n"                              # 7: a file
      "  raise ConfigError(f'config.model.depth={n}')\n"                  # typed: fine
      "  raise ValueError(f'norms_every must be >= 1, got {n}')\n")       # internal: fine
  found = untyped_user_errors(pkg)
  lines = sorted(int(f.split(":")[1]) for f in found)
  assert lines == [4, 5, 6, 7], found
