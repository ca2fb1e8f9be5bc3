"""The package's import graph is one-way: ``main.py`` → ``sfd_jax.jobs`` → parts.

Every import counts, at module level and inside functions (read with ``ast``): no circle
of modules, no part importing a job, no job importing another job, and the package never
imports the repository's ``configs/`` (configs import nothing from the package).
"""
import ast
import pathlib
import shutil

from tests.conftest import REPO

PKG = "sfd_jax"


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root.parent).with_suffix("")
    name = ".".join(rel.parts)
    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
  """sfd_jax modules (and ``configs``) that ``path`` imports anywhere in its body."""
  tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
  base = name.split(".")
  is_init = path.name == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        up = base[:len(base) - node.level + (1 if is_init else 0)]
        mod = ".".join(up + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
    else:
      continue
    for t in targets:
      if t == "configs" or t.startswith("configs."):
        found.add("configs")
        continue
      while t and t not in known:
        t = t.rpartition(".")[0]
      if t and t != name and t.split(".")[0] == PKG:
        found.add(t)
  return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, comps = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return comps


def _job(module: str) -> str | None:
  parts = module.split(".")
  return parts[2] if len(parts) > 2 and parts[1] == "jobs" else None


def findings(root: pathlib.Path) -> list[str]:
  """Every layering violation of the package at ``root`` (empty when it is one-way)."""
  mods = _modules(root)
  known = set(mods)
  graph = {m: _imports(p, m, known) - {m} for m, p in mods.items()}
  # A package's __init__ importing its own submodules is its public face, not a circle.
  graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
  out = [f"import circle: {' <-> '.join(c)}" for c in _cycles(
      {m: ts - {"configs"} for m, ts in graph.items()})]
  for m, ts in sorted(graph.items()):
    for t in sorted(ts):
      if t == "configs":
        out.append(f"{m} imports the repository's configs/ (configs are data)")
      elif _job(t) is not None and _job(m) is None:
        out.append(f"part imports a job: {m} -> {t}")
      elif _job(t) is not None and _job(m) is not None and _job(t) != _job(m):
        out.append(f"job imports another job: {m} -> {t}")
  return out


def test_package_imports_are_one_way():
  assert findings(REPO / PKG) == []


def test_configs_import_nothing_from_the_package():
  bad = []
  for path in sorted((REPO / "configs").glob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for n in names:
        if n.split(".")[0] == PKG:
          bad.append(f"{path.name} imports {n}")
        if n.startswith("configs") and n not in ("configs", "configs.common"):
          bad.append(f"{path.name} imports the sibling config {n}")
        if n == "configs" and isinstance(node, ast.ImportFrom):
          bad += [f"{path.name} imports the sibling config configs.{a.name}"
                  for a in node.names if a.name != "common"]
  assert bad == []


def test_checker_finds_added_violations(tmp_path):
  """The checker is not vacuous: a cycle through an import inside a function, a part
  importing a job and a job importing a job are each reported."""
  root = tmp_path / PKG
  shutil.copytree(REPO / PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
  assert findings(root) == []
  layers = root / "models" / "layers.py"
  layers.write_text(layers.read_text() + "\n\ndef _late():\n"
                    "  from sfd_jax.models import lightning_dit  # noqa\n")
  assert any("import circle" in f and "sfd_jax.models.layers" in f for f in findings(root))
  shutil.copy(REPO / PKG / "models" / "layers.py", layers)
  samplers = root / "diffusion" / "samplers.py"
  samplers.write_text(samplers.read_text() + "\n\ndef _up():\n"
                      "  from sfd_jax.jobs import sample  # noqa\n")
  assert "part imports a job: sfd_jax.diffusion.samplers -> sfd_jax.jobs.sample" in (
      findings(root))
  shutil.copy(REPO / PKG / "diffusion" / "samplers.py", samplers)
  evaluate = root / "jobs" / "evaluate.py"
  evaluate.write_text(evaluate.read_text() + "\nfrom sfd_jax.jobs.sample import run  # noqa\n")
  assert findings(root) == [
      "job imports another job: sfd_jax.jobs.evaluate -> sfd_jax.jobs.sample"]
