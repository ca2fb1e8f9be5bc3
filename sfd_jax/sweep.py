"""Sweeps: expand field overrides of a config into training runs, then show, run or emit them.

  python -m sfd_jax.sweep --config=configs/sfd_xl.py --sweep=delta_t --workdir-root=runs/
  python -m sfd_jax.sweep --config=configs/sfd_b.py --sweep=delta_t_coarse --run
  python -m sfd_jax.sweep --config=configs/sfd_xl.py --sweep=model_size --emit=slurm \\
      --launcher-args='--nodes=4'
  python -m sfd_jax.sweep --config=configs/tiny.py:data=DIR \\
      --sweep='objective.delta_t=0,0.3;model.depth=2,3' --set num_train_steps=50 --run

``--sweep`` is a name from ``configs/sweeps.py`` (which documents the format; another file
with ``--sweeps-file``), loaded from its path, or an ad-hoc product
``field=v1,v2;field2=w1,w2``. Every run gets its own workdir ``<workdir-root>/<sweep>/<run
name>`` whose name is derived from the swept values (``objective.delta_t=0.3`` →
``delta_t-0.3``), so names are stable across invocations and re-running a sweep resumes
each unfinished run from its checkpoints.

Modes: ``--dry-run`` (default) prints one ``main.py`` command per run (a shell script);
``--run`` runs them one after another as subprocesses (from the repository root);
``--emit=slurm|tpu|gpu`` prints the commands that submit each run through the scripts in
``launch/``. Overrides are checked against the config before anything is printed or run:
an unknown field, a value of the wrong type or out of the range its declaration allows
(``sfd_jax.core.options``) is an error naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from sfd_jax.core import options, paths
from sfd_jax.core.errors import ConfigError, format_line
from sfd_jax.core.runner import EXIT_CODE, ArgumentParser, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS_FILE = os.path.join("configs", "sweeps.py")
EMIT_KINDS = ("slurm", "tpu", "gpu")
_SPEC_KEYS = {"product", "list", "base", "description"}
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


class SweepError(ConfigError):
  """A sweep that cannot be expanded or applied to the config."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, the swept and the shared overrides, its workdir."""
  name: str
  overrides: tuple[tuple[str, Any], ...]   # the swept values (they make the name)
  base: tuple[tuple[str, Any], ...]        # applied to every run of the sweep
  workdir: str

  @property
  def all_overrides(self) -> tuple[tuple[str, Any], ...]:
    return self.base + self.overrides

  def flags(self) -> list[str]:
    """``--config.<field>=<value>`` flags for main.py."""
    return [f"--config.{k}={flag_value(v)}" for k, v in self.all_overrides]


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------


def load_config(config_arg: str):
  """Loads ``path.py[:arg]`` with the config-file flag main.py's ``--config`` uses, the
  directory above the config's package on ``sys.path`` (``from configs import common``)."""
  path, colon, arg = config_arg.partition(":")
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise SweepError(f"config file not found: {path}")
  root = paths.package_root(path)
  if root not in sys.path:
    sys.path.insert(0, root)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=False)
  try:
    flag_values(["sweep", f"--config={path}{colon}{arg}"])
    config = flag_values["config"].value
    config.keys()        # a load error ml_collections deferred is raised here
  except Exception as e:  # pylint: disable=broad-except  (the file's own error)
    cause = e.__cause__ or e
    last = (str(cause).strip().splitlines() or [""])[-1]
    raise SweepError(f"--config={config_arg}: cannot load the config file "
                     f"({type(cause).__name__}: {last}); check the file and the options "
                     "after ':'") from e
  return config


def _load_file(path: str, prefix: str):
  name = prefix + re.sub(r"\W", "_", path)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def default_sweeps_file(config_arg: str | None = None) -> str:
  """``configs/sweeps.py`` of the config file's repository (the directory above its
  package), else of the current directory, else of this repository."""
  roots = [paths.package_root(config_arg.partition(":")[0])] if config_arg else []
  candidates = [os.path.join(r, SWEEPS_FILE) for r in roots + [os.getcwd(), REPO]]
  return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def named_sweep(name: str, sweeps_file: str | None = None) -> dict:
  """The sweep ``name`` of a sweeps file (``get_sweep(name)``; default
  ``default_sweeps_file()``), loaded from its path."""
  path = os.path.abspath(sweeps_file or default_sweeps_file())
  if not os.path.isfile(path):
    raise SweepError(f"sweeps file not found: {path}")
  module = _load_file(path, "_sfd_sweeps_")
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep()")
  try:
    return module.get_sweep(name)
  except KeyError as e:
    raise SweepError(e.args[0]) from e


def _lookup(config, field: str):
  """(parent ConfigDict, leaf key) of a dotted field; errors name the field."""
  parts = field.split(".")
  node, walked = config, []
  for i, key in enumerate(parts):
    keys = list(node.keys())
    if key not in keys:
      where = ".".join(walked) or "the config"
      near = difflib.get_close_matches(key, keys, n=3)
      hint = f"; did you mean {', '.join(repr('.'.join(walked + [n])) for n in near)}?" \
          if near else ""
      raise SweepError(f"unknown config field '{field}': {where} has no '{key}' "
                       f"(it has: {', '.join(sorted(keys))}){hint}")
    if i == len(parts) - 1:
      return node, key
    child = node[key]
    if not isinstance(child, ml_collections.ConfigDict):
      prefix = ".".join(walked + [key])
      raise SweepError(f"unknown config field '{field}': '{prefix}' is a "
                       f"{type(child).__name__}, not a section")
    node, walked = child, walked + [key]
  raise SweepError(f"empty config field name {field!r}")


def coerce(value: Any, current: Any, field: str) -> Any:
  """A command-line string converted to the type of the field's current value."""
  if not isinstance(value, str) or isinstance(current, str) or current is None:
    return value
  text = value.strip()
  try:
    if isinstance(current, bool):
      low = text.lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError as e:
    raise SweepError(f"config field '{field}' is a {type(current).__name__}; cannot use "
                     f"{value!r}") from e
  return value


def apply_overrides(config, overrides: Iterable[tuple[str, Any]]):
  """A copy of ``config`` with the dotted-field overrides applied (checked). A mapping
  value sets the fields of a section (``("objective", {"delta_t": 0.0})``), or adds a
  section the config does not have (``("schedule", {...})``: in-process runs only, such
  a value has no ``--config`` flag)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for field, value in overrides:
    _apply(out, field, value)
  return out


def _apply(out, field: str, value: Any) -> None:
  if isinstance(value, Mapping):
    head, _, key = field.rpartition(".")
    parent = _lookup(out, head)[0][head.rpartition(".")[2]] if head else out
    if key not in parent:
      parent[key] = ml_collections.ConfigDict(dict(value))
    elif not isinstance(parent[key], ml_collections.ConfigDict):
      raise SweepError(f"config field '{field}' is a {type(parent[key]).__name__}, not a "
                       "section")
    else:
      for k, v in value.items():
        _apply(out, f"{field}.{k}", v)
    return
  parent, key = _lookup(out, field)
  current = parent[key]
  if isinstance(current, ml_collections.ConfigDict):
    raise SweepError(f"config field '{field}' is a section; sweep one of its fields")
  value = coerce(value, current, field)
  if not _is_scalar(value):
    raise SweepError(f"'{field}': sweep values must be numbers, booleans or strings, "
                     f"got {value!r}")
  try:
    parent[key] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f"config field '{field}' ({type(current).__name__}) cannot be set to "
                     f"{value!r}: {e}") from e


def _is_scalar(v) -> bool:
  return isinstance(v, (bool, int, float, str))


# ----------------------------------------------------------------------------------
# Sweep specs -> override lists
# ----------------------------------------------------------------------------------


def parse_adhoc(text: str) -> dict:
  """``'a.b=1,2;c=x'`` -> ``{"product": {"a.b": ["1", "2"], "c": ["x"]}}`` (strings; they
  are converted to each field's type when applied)."""
  product: dict[str, list[str]] = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    field, eq, values = part.partition("=")
    field = field.strip()
    if not eq or not field:
      raise SweepError(f"ad-hoc sweep part {part!r}: expected field=value1,value2,...")
    if field in product:
      raise SweepError(f"ad-hoc sweep: field '{field}' given twice")
    product[field] = [v.strip() for v in values.split(",")]
  if not product:
    raise SweepError(f"empty ad-hoc sweep {text!r}")
  return {"product": product}


def resolve(sweep: str | Mapping, sweeps_file: str | None = None) -> tuple[str, dict]:
  """``(name, spec)`` for a sweep name (of ``sweeps_file``, default configs/sweeps.py; see
  ``named_sweep``), ad-hoc text, or a spec dict."""
  if isinstance(sweep, Mapping):
    return "sweep", dict(sweep)
  if "=" in sweep:
    return "sweep", parse_adhoc(sweep)
  return sweep, named_sweep(sweep, sweeps_file)


def expand(spec: Mapping, name: str = "sweep") -> list[tuple[tuple[str, Any], ...]]:
  """The runs of a spec, each an ordered tuple of (field, value) overrides."""
  unknown = set(spec) - _SPEC_KEYS
  if unknown:
    raise SweepError(f"sweep '{name}': unknown keys {sorted(unknown)}; a sweep has "
                     f"{sorted(_SPEC_KEYS)}")
  if "product" not in spec and "list" not in spec:
    raise SweepError(f"sweep '{name}' needs a 'product' or a 'list'")
  listed = [()]
  if "list" in spec:
    if not isinstance(spec["list"], (list, tuple)) or not spec["list"]:
      raise SweepError(f"sweep '{name}': 'list' must be a non-empty list of override dicts")
    listed = []
    for i, item in enumerate(spec["list"]):
      if not isinstance(item, Mapping):
        raise SweepError(f"sweep '{name}': list item {i} is {item!r}, expected a dict")
      listed.append(tuple(item.items()))
  grid = [()]
  if "product" in spec:
    axes = spec["product"]
    if not isinstance(axes, Mapping) or not axes:
      raise SweepError(f"sweep '{name}': 'product' must map fields to lists of values")
    for field, values in axes.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f"sweep '{name}': product field '{field}' needs a non-empty list "
                         f"of values, got {values!r}")
    grid = [tuple(zip(axes, combo)) for combo in itertools.product(*axes.values())]
  runs = []
  for item in listed:
    for point in grid:
      fields = [f for f, _ in item] + [f for f, _ in point]
      twice = sorted({f for f in fields if fields.count(f) > 1})
      if twice:
        raise SweepError(f"sweep '{name}': field(s) {twice} set by both 'list' and 'product'")
      runs.append(item + point)
  return runs


def mean_std(results: Mapping[str, Mapping[str, float]], groups: Mapping[str, Sequence[str]],
             metrics: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
  """Per group of runs (e.g. the seeds of one setting) and metric: the runs' values,
  their mean and their standard deviation (ddof 1; 0 for a single run)."""
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for group, names in groups.items():
    out[group] = {}
    for metric in metrics:
      vals = [float(results[n][metric]) for n in names]
      out[group][metric] = {"values": vals, "mean": float(np.mean(vals)),
                            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
  return out


def value_token(v: Any) -> str:
  """A filesystem-safe, stable spelling of a swept value (0.30 → '0.3', 1.0 → '1')."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    text = repr(v)
    return text[:-2] if text.endswith(".0") else text
  text = _SAFE.sub("_", str(v))
  return text or "empty"


def flag_value(v: Any) -> str:
  """A value as ml_collections' ``--config.field=`` parser reads it."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return repr(v)
  return str(v)


def field_labels(fields: Sequence[str]) -> dict[str, str]:
  """Shortest unique dotted suffix of each field (``objective.delta_t`` → ``delta_t``)."""
  labels = {}
  for f in fields:
    parts = f.split(".")
    for n in range(1, len(parts) + 1):
      label = ".".join(parts[-n:])
      if all(g == f or not (g == label or g.endswith("." + label)) for g in fields):
        break
    labels[f] = label
  return labels


def run_name(overrides: Sequence[tuple[str, Any]], labels: Mapping[str, str]) -> str:
  """``(("objective.delta_t", 0.3), ("model.variant", "XL"))`` → ``delta_t-0.3_variant-XL``."""
  if not overrides:
    return "base"
  return "_".join(f"{_SAFE.sub('_', labels[f])}-{value_token(v)}" for f, v in overrides)


def make_runs(config, sweep: str | Mapping, workdir_root: str = "runs",
              base: Sequence[tuple[str, Any]] = (), sweep_dir: str | None = None,
              sweeps_file: str | None = None) -> list[Run]:
  """Expands ``sweep`` against ``config`` (a ConfigDict): checks every override on a copy
  of the config and converts string values to the field types. ``base`` overrides
  (e.g. from ``--set``) apply to every run after the sweep's own ``base``. Named sweeps
  come from ``sweeps_file`` (see ``resolve``)."""
  name, spec = resolve(sweep, sweeps_file)
  raw_runs = expand(spec, name)
  shared = tuple((spec.get("base") or {}).items()) + tuple(base)
  typed_shared = _typed(config, shared)
  fields = list(dict.fromkeys(f for run in raw_runs for f, _ in run))
  labels = field_labels(fields)
  runs, seen = [], {}
  root = os.path.join(workdir_root, sweep_dir or name)
  for raw in raw_runs:
    typed = _typed(config, raw)
    # the combination must be valid too: every field against its declaration
    options.check(apply_overrides(config, typed_shared + typed))
    rname = run_name(typed, labels)
    if rname in seen:
      raise SweepError(f"sweep '{name}': runs {dict(seen[rname])} and {dict(typed)} get the "
                       f"same name '{rname}'")
    seen[rname] = typed
    runs.append(Run(rname, typed, typed_shared, os.path.join(root, rname)))
  return runs


def _typed(config, overrides) -> tuple[tuple[str, Any], ...]:
  out = []
  for field, value in overrides:
    if isinstance(value, Mapping):
      raise SweepError(f"'{field}': a section value has no --config flag; sweep its fields")
    parent, key = _lookup(config, field)
    out.append((field, coerce(value, parent[key], field)))
  return tuple(out)


# ----------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------


def train_args(run: Run, config_arg: str) -> list[str]:
  """main.py's arguments for one run."""
  return [f"--config={config_arg}", f"--workdir={run.workdir}", *run.flags()]


def local_command(run: Run, config_arg: str, python: str = "python") -> list[str]:
  return [python, "main.py", *train_args(run, config_arg)]


def emit_command(run: Run, config_arg: str, kind: str, sweep_name: str,
                 launcher_args: Sequence[str] = ()) -> list[str]:
  """The command submitting ``run`` through a script of ``launch/`` (from the repo root)."""
  job = f"{sweep_name}-{run.name}"
  if kind == "slurm":
    return ["sbatch", f"--job-name={job}", *launcher_args, "launch/slurm_multinode.sbatch",
            "--", *train_args(run, config_arg)]
  if kind == "tpu":
    # --foreground: the emitted lines, run as a script, train one run after another.
    return ["launch/tpu_pod.sh", "--foreground", f"--run-name={job}", *launcher_args, "--",
            *train_args(run, config_arg)]
  if kind == "gpu":
    return ["launch/gpu_single_host.sh", f"--log={os.path.join(run.workdir, 'train.log')}",
            *launcher_args, "--", *train_args(run, config_arg)]
  raise SweepError(f"--emit={kind!r}: expected one of {EMIT_KINDS}")


def shell_line(cmd: Sequence[str]) -> str:
  return " ".join(shlex.quote(c) for c in cmd)


def describe(runs: Sequence[Run]) -> list[str]:
  """Comment lines (a shell script header) listing the runs."""
  lines = [f"# {len(runs)} run(s)"]
  if runs and runs[0].base:
    lines.append("# every run: " + " ".join(f"{k}={flag_value(v)}" for k, v in runs[0].base))
  for r in runs:
    sets = " ".join(f"{k}={flag_value(v)}" for k, v in r.overrides) or "(no overrides)"
    lines.append(f"#   {r.name}: {sets} -> {r.workdir}")
  return lines


def run_locally(runs: Sequence[Run], config_arg: str, keep_going: bool = False,
                python: str | None = None, cwd: str = REPO) -> dict[str, int]:
  """Runs each run as ``python main.py ...`` in turn (stopping at the first failure
  unless ``keep_going``); returns ``{run name: exit code}`` of the runs started."""
  codes: dict[str, int] = {}
  for i, run in enumerate(runs):
    cmd = local_command(run, config_arg, python or sys.executable)
    print(f"[{i + 1}/{len(runs)}] {run.name}: {shell_line(cmd)}", flush=True)
    codes[run.name] = subprocess.call(cmd, cwd=cwd)
    if codes[run.name]:
      print(f"[{i + 1}/{len(runs)}] {run.name} failed with exit code {codes[run.name]}",
            flush=True)
      if not keep_going:
        break
  return codes


def main(argv: Sequence[str] | None = None) -> int:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="config file[:arg], as for main.py")
  ap.add_argument("--sweep", required=True,
                  help="name from configs/sweeps.py, or 'field=v1,v2;field2=w1,w2'")
  ap.add_argument("--sweeps-file", "--sweeps_file", dest="sweeps_file", default=None,
                  help="file of named sweeps (default: configs/sweeps.py of the config's "
                       "repository, else of the current directory)")
  mode = ap.add_mutually_exclusive_group()
  mode.add_argument("--dry-run", action="store_true", help="print the commands (default)")
  mode.add_argument("--run", action="store_true", help="run them here, one after another")
  mode.add_argument("--emit", choices=EMIT_KINDS, help="print launch/ commands for a cluster")
  ap.add_argument("--workdir-root", default="runs",
                  help="runs go to <root>/<sweep>/<run> (default: runs)")
  ap.add_argument("--name", default=None, help="sweep directory name (default: the sweep's)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="override for every run (repeatable)")
  ap.add_argument("--only", default="", help="comma-separated run names to keep")
  ap.add_argument("--launcher-args", default="",
                  help="extra arguments for the launcher (sbatch options, tpu_pod.sh flags)")
  ap.add_argument("--keep-going", action="store_true", help="--run: continue after a failure")
  ap.add_argument("--python", default=sys.executable,
                  help="--run: interpreter for main.py (default: this one)")
  args = ap.parse_args(argv)

  base = []
  for item in args.set:
    field, eq, value = item.partition("=")
    if not eq:
      ap.error(f"--set {item!r}: expected FIELD=VALUE")
    base.append((field.strip(), value))
  try:
    config = load_config(args.config)
    sweeps_file = args.sweeps_file or default_sweeps_file(args.config)
    sweep_name, _ = resolve(args.sweep, sweeps_file)
    runs = make_runs(config, args.sweep, args.workdir_root, base, args.name, sweeps_file)
    if args.only:
      keep = [n for n in args.only.split(",") if n]
      missing = sorted(set(keep) - {r.name for r in runs})
      if missing:
        raise SweepError(f"--only: no run named {missing}; runs: {[r.name for r in runs]}")
      runs = [r for r in runs if r.name in keep]
  except SweepError as e:
    print(format_line("python -m sfd_jax.sweep", e), file=sys.stderr)
    return EXIT_CODE
  dir_name = args.name or sweep_name
  if args.run:
    codes = run_locally(runs, args.config, keep_going=args.keep_going, python=args.python)
    failed = [n for n, rc in codes.items() if rc]
    print(f"{len(codes) - len(failed)} of {len(runs)} run(s) finished"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or len(codes) < len(runs) else 0
  print("\n".join(describe(runs)))
  if args.emit:
    extra = shlex.split(args.launcher_args)
    for r in runs:
      print(shell_line(emit_command(r, args.config, args.emit, dir_name, extra)))
  else:
    for r in runs:
      print(shell_line(local_command(r, args.config)))
  return 0


if __name__ == "__main__":
  run_cli(main, "python -m sfd_jax.sweep")
