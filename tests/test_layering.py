"""The package's declared order (docs/architecture.md), checked on every import.

Every ``import`` counts, at module level and inside functions (read with ``ast``). A
module may import its own package and the packages of lower layers, never a higher layer
or a package beside it in its layer; no circle of modules; no job imports another job;
the package never imports the repository's ``configs/`` (configs import nothing from the
package).
"""
import ast
import pathlib
import shutil

from tests.conftest import REPO

PKG = "sfd_jax"
# Bottom to top; the packages of one layer do not import each other.
LAYERS = (
    ("core",),
    ("models",),
    ("diffusion",),
    ("parallel",),
    ("data",),
    ("convert",),
    ("checkpoint",),
    ("metrics",),
    ("sampling",),
    ("training", "sweep"),
    ("planning",),
    ("jobs",),
    ("cli",),
)
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


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


def _package(module: str) -> str | None:
  """``sfd_jax.x.y`` → ``x``; the root package (flax settings only) → None;
  ``sfd_jax.__main__`` (``python -m sfd_jax``) belongs to ``cli``."""
  parts = module.split(".")
  if parts[1:] == ["__main__"]:
    return "cli"
  return parts[1] if len(parts) > 1 else None


def _job(module: str) -> str | None:
  parts = module.split(".")
  return parts[2] if len(parts) > 2 and parts[1] == "jobs" else None


def findings(root: pathlib.Path) -> list[str]:
  """Every violation of the declared order in the package at ``root`` (empty: none)."""
  mods = _modules(root)
  known = set(mods)
  graph = {m: _imports(p, m, known) - {m} for m, p in mods.items()}
  # A package's __init__ importing its own submodules is its public face, not a circle.
  graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
  out = [f"import circle: {' <-> '.join(c)}" for c in _cycles(
      {m: ts - {"configs"} for m, ts in graph.items()})]
  for m in sorted(mods):
    pkg = _package(m)
    if pkg is not None and pkg not in LAYER:
      out.append(f"{m}: package '{pkg}' has no place in the declared order")
  for m, ts in sorted(graph.items()):
    for t in sorted(ts):
      src, dst = _package(m), _package(t)
      if t == "configs":
        out.append(f"{m} imports the repository's configs/ (configs are data)")
      elif _job(t) is not None and _job(m) is not None and _job(t) != _job(m):
        out.append(f"job imports another job: {m} -> {t}")
      elif dst is None or src == dst or src not in LAYER or dst not in LAYER:
        continue
      elif LAYER[dst] > LAYER[src]:
        out.append(f"upward import: {m} -> {t} ('{dst}' is above '{src}')")
      elif LAYER[dst] == LAYER[src]:
        out.append(f"import within a layer: {m} -> {t} ('{src}' and '{dst}' are peers)")
  return out


def test_package_follows_the_declared_order():
  assert findings(REPO / PKG) == []


def test_diffusion_is_math_without_io():
  """``sfd_jax/diffusion/`` reads and writes no files and imports no checkpoint, convert or
  data module: runs to files are ``sfd_jax.sampling``."""
  root = REPO / PKG
  known = set(_modules(root))
  bad = []
  for path in sorted((root / "diffusion").glob("*.py")):
    text = path.read_text(encoding="utf-8")
    bad += [f"{path.name}: {s}" for s in ("open(", "np.save", "savez", "PIL", ".save(")
            if s in text]
    bad += [f"{path.name} imports {t}" for t in sorted(_imports(
        path, f"{PKG}.diffusion.{path.stem}", known))
            if _package(t) in ("checkpoint", "convert", "data")]
  assert bad == []


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


def test_docs_state_the_declared_order():
  """docs/architecture.md writes the same order, bottom to top."""
  text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
  line = next(l for l in text.splitlines() if l.strip().startswith("core →"))
  written = [tuple(p.strip() for p in layer.split(",")) for layer in line.strip().split("→")]
  assert tuple(written) == LAYERS


def test_checker_finds_added_violations(tmp_path):
  """The checker is not vacuous: a circle through an import inside a function, an upward
  import inside a function, an import between peers and a job importing a job are each
  reported."""
  root = tmp_path / PKG
  shutil.copytree(REPO / PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
  assert findings(root) == []

  def append(rel, text):
    path = root / rel
    original = path.read_text()
    path.write_text(original + text)
    return lambda: path.write_text(original)

  undo = append("models/layers.py", "\n\ndef _late():\n"
                "  from sfd_jax.models import lightning_dit  # noqa\n")
  assert any("import circle" in f and "sfd_jax.models.layers" in f for f in findings(root))
  undo()
  undo = append("diffusion/samplers.py", "\n\ndef _up():\n"
                "  from sfd_jax.checkpoint.runs import is_run  # noqa\n")
  assert findings(root) == [
      "upward import: sfd_jax.diffusion.samplers -> sfd_jax.checkpoint.runs "
      "('checkpoint' is above 'diffusion')"]
  undo()
  undo = append("sweep.py", "\nfrom sfd_jax.training import loop  # noqa\n")
  assert findings(root) == ["import within a layer: sfd_jax.sweep -> sfd_jax.training.loop "
                            "('sweep' and 'training' are peers)"]
  undo()
  undo = append("jobs/evaluate.py", "\nfrom sfd_jax.jobs.sample import run  # noqa\n")
  assert findings(root) == [
      "job imports another job: sfd_jax.jobs.evaluate -> sfd_jax.jobs.sample"]
  undo()
  assert findings(root) == []
