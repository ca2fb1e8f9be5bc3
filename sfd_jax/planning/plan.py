"""``--mode=plan``: compile a config's programs for a TPU topology and report what fits.

``make_plan(config, workdir)`` reads ``config.plan`` (defaults below), gets compile-only
devices of the topology (``planning.tpu``), builds the programs of the config
(``planning.programs``) and compiles each with the real TPU compiler. Per compiled
program and global batch it records:

* **HBM per chip** from ``compiled.memory_analysis()``: arguments, outputs, aliased
  (donated), temporaries, and the live total = arguments + outputs − aliased +
  temporaries, against the chip's HBM as the TPU compiler counts it (``usable``); a
  program the compiler rejects as too large is recorded with the memory it asked for;
* **FLOPs**: the matmul FLOPs of the optimized program with loop trip counts
  (``planning.hlo``), all chips, against the analytic count (``planning.flops``), and
  XLA's own ``cost_analysis`` figure (loop bodies counted once) for reference;
* **collectives** per call and chip: count and bytes by kind;
* whether any array in a chip's program starts with ``[global batch, tokens]`` — a
  chip holding the whole batch where it should hold its share (DiT train step);
* lowering and compile time.

Per remat policy (DiT) or program (VAE, encode) it then finds the largest global batch
that fits by compiling (``search_max_batch``): from the configured batch, each next
batch is where the line through the two measured batches nearest the boundary reaches
the chip's HBM (memory is close to linear in the batch), until the largest batch that
fits and the smallest that does not are within ``search_tolerance`` or
``search_compiles`` compiles are spent.

``plan.json`` and ``plan.md`` in the workdir are rewritten after every compile (a
crash keeps what was done); the table is printed at the end. A program that does not
fit at the configured settings ends the run with one line naming the fields to change
(exit 2), after the report is written.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Any

from absl import logging

from sfd_jax.planning import hlo, programs as programs_lib, tpu
from sfd_jax.planning.tpu import PlanError

GIB = 2.0 ** 30

# TPU HBM per chip as the TPU compiler of the pinned libtpu counts it ("available HBM"
# in its out-of-memory message), measured by compiling past it; the nominal sizes are
# 16 / 95 / 32 / 32 GiB.
USABLE_HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}

DEFAULTS: dict[str, Any] = {
    "topology": "v5p:2x2x2",
    "num_slices": 1,
    "programs": "auto",
    "batch_sizes": "",
    "remat_policies": "",
    "search_max_batch": True,
    "search_compiles": 4,
    "search_limit": 16384,
    "search_tolerance": 0.05,
    "hbm_gib": 0.0,
    "guide_variant": "B",
    "decoder_preset": "f16d32",
    "feature_tokens": 256,
    "attention_baseline": "xla",
}
PROGRAMS = {"sfd": ("train", "sample"), "semvae": ("vae_train",),
            "texture_vae": ("vae_train",), "encode": ("encode",)}


@dataclasses.dataclass(frozen=True)
class Settings:
  topology: str
  num_slices: int
  programs: tuple[str, ...]
  batch_sizes: tuple[int, ...]
  remat_policies: tuple[str, ...]
  search_max_batch: bool
  search_compiles: int
  search_limit: int
  search_tolerance: float
  hbm_gib: float
  guide_variant: str
  decoder_preset: str
  feature_tokens: int
  attention_baseline: str


def _list(value, cast, field):
  if isinstance(value, (list, tuple)):
    items = list(value)
  else:
    items = [x.strip() for x in str(value).split(",") if x.strip()]
  try:
    return tuple(cast(x) for x in items)
  except (TypeError, ValueError) as e:
    raise PlanError(f"config.plan.{field}={value!r}: expected a comma-separated list of "
                    f"{cast.__name__} values") from e


def settings(config, kind: str) -> Settings:
  """``config.plan`` with the defaults filled in, checked."""
  section = config.get("plan")
  given = dict(DEFAULTS)
  if section is not None:
    unknown = set(section.keys()) - set(DEFAULTS)
    if unknown:
      raise PlanError(f"config.plan has unknown fields {sorted(unknown)}; known: "
                      f"{sorted(DEFAULTS)}")
    given.update(section.to_dict())
  progs = _list(given["programs"], str, "programs")
  if progs in ((), ("auto",)):
    progs = PROGRAMS[kind]
  bad = [p for p in progs if p not in PROGRAMS[kind]]
  if bad:
    raise PlanError(f"config.plan.programs={given['programs']!r}: {bad} are not programs "
                    f"of this config; it runs {list(PROGRAMS[kind])} (or 'auto')")
  batches = _list(given["batch_sizes"], int, "batch_sizes")
  if any(b <= 0 for b in batches):
    raise PlanError(f"config.plan.batch_sizes={given['batch_sizes']!r}: batches must be > 0")

  def positive(field, cast=int):
    v = given[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
      raise PlanError(f"config.plan.{field} must be a number > 0, got {v!r}")
    return cast(v)

  hbm = given["hbm_gib"]
  if isinstance(hbm, bool) or not isinstance(hbm, (int, float)) or hbm < 0:
    raise PlanError(f"config.plan.hbm_gib must be a number >= 0 (0: the chip's), got {hbm!r}")
  return Settings(
      topology=str(given["topology"]), num_slices=given["num_slices"], programs=progs,
      batch_sizes=batches, remat_policies=_list(given["remat_policies"], str,
                                                "remat_policies"),
      search_max_batch=bool(given["search_max_batch"]),
      search_compiles=int(given["search_compiles"]),
      search_limit=positive("search_limit"),
      search_tolerance=positive("search_tolerance", float), hbm_gib=float(hbm),
      guide_variant=str(given["guide_variant"]), decoder_preset=str(given["decoder_preset"]),
      feature_tokens=positive("feature_tokens"),
      attention_baseline=str(given["attention_baseline"] or ""))


# ------------------------------------------------------------------ one compile


_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|out of memory", re.I)
_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1.0 / GIB, "K": 2.0 ** -20, "M": 2.0 ** -10, "G": 1.0, "T": 1024.0}


def _gib(match) -> float | None:
  return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def compile_row(program: programs_lib.Program, batch: int, *, chips: int,
                capacity_gib: float) -> dict[str, Any]:
  """Lowers and compiles ``program`` at global ``batch``; its row of the report."""
  row: dict[str, Any] = {"program": program.name, "title": program.title,
                         "batch": int(batch), "per_chip_batch": batch / program.batch_unit,
                         **{k: v for k, v in program.settings.items() if k in
                            ("remat", "attention", "variant")}}
  logging.info("plan: compiling %s at batch %d", program.title, batch)
  t0 = time.perf_counter()
  lowered = program.lower(batch)
  row["lower_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = " ".join(str(e).split())
    if not _OOM.search(text):
      raise
    row.update(compile_s=time.perf_counter() - t0, compiled=False, fits=False,
               error=text[:300], required_temp_gib=_gib(_REQUIRED.search(text)),
               compiler_hbm_gib=_gib(_AVAILABLE.search(text)))
    return row
  row["compile_s"] = time.perf_counter() - t0
  m = compiled.memory_analysis()
  mem = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  row.update({f"{k}_gib": v / GIB for k, v in mem.items()})
  row.update(total_gib=total / GIB, code_mib=m.generated_code_size_in_bytes / 2 ** 20,
             compiled=True, fits=total / GIB <= capacity_gib,
             hbm_fraction=total / GIB / capacity_gib)
  leading = program.leading(batch) if program.leading else []
  analysis = hlo.analyze(compiled.as_text(), leading_dims=leading)
  row["matmul_tflop"] = analysis.matmul_flops * chips / 1e12
  if program.analytic is not None:
    analytic = program.analytic(batch)
    row["analytic_tflop"] = analytic / 1e12
    row["compiled_over_analytic"] = (analysis.matmul_flops * chips / analytic
                                     if analytic else None)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  row["xla_cost_tflop_loops_once"] = float((cost or {}).get("flops", 0.0)) * chips / 1e12
  row["collectives"] = {k: {"count": v["count"], "gib": v["bytes"] / GIB}
                        for k, v in sorted(analysis.collectives.items())}
  row["collective_gib"] = sum(v["bytes"] for v in analysis.collectives.values()) / GIB
  row["loops_of_unknown_length"] = analysis.unknown_trip_loops
  row["kernels"] = {k: v for k, v in analysis.custom_calls.items()
                    if k not in ("AllocateBuffer", "AssumeGatherIndicesInBound", "ZeroCrop")}
  if leading:
    row["global_batch_arrays"] = analysis.leading_matches
    row["global_batch_examples"] = analysis.leading_examples
  return row


def _mem_estimates(rows: dict[int, dict]) -> dict[int, float]:
  """Per-chip GiB each compiled batch needs: the live total, or for a batch the
  compiler rejected, the temporaries it asked for plus the non-temporary memory of a
  compiled batch (the state; it hardly depends on the batch)."""
  fixed = next((r["total_gib"] - r["temp_gib"] for r in rows.values() if r.get("compiled")),
               0.0)
  out = {}
  for b, r in rows.items():
    if r.get("compiled"):
      out[b] = r["total_gib"]
    elif r.get("required_temp_gib") is not None:
      out[b] = r["required_temp_gib"] + fixed
  return out


def search_max_batch(program: programs_lib.Program, rows: dict[int, dict], compile_at,
                     s: Settings, capacity_gib: float) -> dict[str, Any]:
  """The largest global batch (a multiple of ``program.batch_unit``) that fits; ``rows``
  holds rows already compiled (by batch) and gets the new ones.

  From the configured batch, each next batch is where the straight line through the two
  measured batches nearest the boundary reaches the chip's HBM (per-chip memory is close
  to linear in the batch); with one measurement it doubles or halves. A probe is kept at
  least ``search_tolerance`` (and one batch unit) away from the batches that bracket the
  boundary, and the search stops when they are that close or ``search_compiles``
  compiles are spent.
  """
  unit = program.batch_unit
  limit = max(unit, s.search_limit // unit * unit)
  budget = s.search_compiles
  start = max(unit, program.batch // unit * unit)
  if start not in rows:
    budget -= 1
    rows[start] = compile_at(start)

  def bounds():
    fits = [b for b, r in rows.items() if r["fits"]]
    lo = max(fits) if fits else None
    fails = [b for b, r in rows.items() if not r["fits"] and (lo is None or b > lo)]
    return lo, (min(fails) if fails else None)

  while budget > 0:
    lo, hi = bounds()
    step = lambda ref: max(unit, -(-int(s.search_tolerance * ref) // unit) * unit)  # noqa: E731
    if lo is not None and hi is not None and hi - lo <= step(lo):
      break
    if lo is not None and hi is None and lo >= limit:
      break
    if lo is None and hi is not None and hi <= unit:
      break
    mem = _mem_estimates(rows)
    near = sorted(mem, key=lambda b: (abs(mem[b] - capacity_gib), b))[:2]
    if lo is not None and hi is not None and lo in mem and hi in mem:
      near = [lo, hi]
    guess = None
    if len(near) == 2 and mem[near[0]] != mem[near[1]]:
      (b0, b1), (m0, m1) = near, (mem[near[0]], mem[near[1]])
      guess = b0 + (capacity_gib - m0) * (b1 - b0) / (m1 - m0)
    if lo is not None and hi is None:       # everything fits so far: go up
      top = min(limit, 4 * lo)
      guess = 2 * lo if guess is None else min(max(guess, lo + step(lo)), top)
    elif lo is None:                        # nothing fits so far: go down
      guess = hi / 2 if guess is None else max(min(guess, hi - step(hi)), unit)
    else:                                   # bracketed: stay inside, away from the ends
      if guess is None or not lo < guess < hi:
        guess = (lo + hi) / 2
      guess = min(max(guess, lo + step(lo)), hi - unit)
    b = int(guess) // unit * unit
    if b in rows or b < unit:
      break
    budget -= 1
    rows[b] = compile_at(b)
  lo, hi = bounds()
  out = {"program": program.name, "title": program.title,
         "remat": program.settings.get("remat"), "max_batch": lo, "first_failing": hi,
         "limit": limit, "compiles": s.search_compiles - budget,
         "per_chip_max_batch": None if lo is None else lo / unit}
  if lo is not None:
    out["max_batch_total_gib"] = rows[lo].get("total_gib")
  return out


# ------------------------------------------------------------------ the report


def _versions() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "libtpu": tpu.libtpu_version(), "python": sys.version.split()[0],
          "compiled_on": f"{os.cpu_count()}-core {cpu}",
          "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _fmt(v, spec=".2f", none="–"):
  if v is None:
    return none
  if isinstance(v, bool):
    return "yes" if v else "**no**"
  if isinstance(v, float):
    return format(v, spec)
  return str(v)


def _collectives_text(row) -> str:
  parts = []
  for kind, c in (row.get("collectives") or {}).items():
    parts.append(f"{kind} {c['count']:.0f}× {c['gib']:.2f}")
  return "; ".join(parts) or "none"


def table_lines(report: dict) -> list[str]:
  """The markdown table of every compiled row."""
  head = ("| program | batch | per chip | arguments GiB | temporaries GiB | live total GiB "
          "| of HBM | fits | compile s | matmul TFLOP (all chips) | ÷ analytic "
          "| collectives per call: count× GiB/chip |")
  lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
  for r in report["rows"]:
    if r.get("compiled"):
      lines.append(
          f"| {r['title']} | {r['batch']} | {_fmt(r['per_chip_batch'], 'g')} "
          f"| {_fmt(r['argument_gib'])} | {_fmt(r['temp_gib'])} | {_fmt(r['total_gib'])} "
          f"| {r['hbm_fraction'] * 100:.0f} % | {_fmt(r['fits'])} | {r['compile_s']:.0f} "
          f"| {_fmt(r.get('matmul_tflop'), '.1f')} "
          f"| {_fmt(r.get('compiled_over_analytic'), '.3f')} | {_collectives_text(r)} |")
    else:
      need = r.get("required_temp_gib")
      lines.append(
          f"| {r['title']} | {r['batch']} | {_fmt(r['per_chip_batch'], 'g')} | – "
          f"| {_fmt(need) if need else '–'} (asked) | – | > 100 % | **no** "
          f"| {r['compile_s']:.0f} | – | – | rejected by the compiler |")
  return lines


def markdown(report: dict) -> str:
  t = report["topology"]
  out = [f"# Plan: {report['config']} on {t['label']}", "",
         f"{t['chips']} × {t['chip']} ({t['device_kind']}), {report['capacity_gib']:.2f} GiB "
         f"HBM per chip as the TPU compiler counts it ({t['nominal_hbm_gib']:g} GiB "
         f"nominal); {t['hosts']} host(s). Compiled ahead of time with jax "
         f"{report['versions']['jax']}, libtpu {report['versions']['libtpu']} on "
         f"{report['versions']['compiled_on']} ({report['versions']['date_utc']} UTC)"
         f"{'' if report['complete'] else '; **incomplete**'}.", ""]
  out += table_lines(report) + [""]
  if report["searches"]:
    out += ["## Largest global batch that fits", "",
            "| program | largest fitting batch | per chip | live total GiB | first batch that "
            "does not fit | compiles |", "|---|---|---|---|---|---|"]
    for sr in report["searches"]:
      beyond = f"> {sr['limit']} (limit)"
      out.append(f"| {sr['title']} | {_fmt(sr['max_batch'], 'g', 'none')} "
                 f"| {_fmt(sr['per_chip_max_batch'], 'g')} "
                 f"| {_fmt(sr.get('max_batch_total_gib'))} "
                 f"| {_fmt(sr['first_failing'], 'g', beyond)} | {sr['compiles']} |")
    out.append("")
  if report.get("attention"):
    a = report["attention"]
    out += ["## Attention kernel", "", a["text"], ""]
  checks = [r for r in report["rows"] if "global_batch_arrays" in r and r.get("compiled")]
  if checks:
    bad = [r for r in checks if r["global_batch_arrays"]]
    out += ["## Activation sharding", ""]
    if bad:
      out.append(f"**{len(bad)} train-step program(s) hold arrays of the whole global batch "
                 f"on one chip**, e.g. {bad[0]['global_batch_examples'][:2]}.")
    else:
      out.append("No array in any compiled train step starts with [global batch, tokens]: "
                 "every chip holds only its share of the batch.")
    out.append("")
  out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
  if report["problems"]:
    out += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
  return "\n".join(out) + "\n"


def _write(workdir: str, report: dict) -> None:
  from etils import epath  # pylint: disable=import-outside-toplevel
  base = epath.Path(workdir)
  base.mkdir(parents=True, exist_ok=True)
  for name, text in (("plan.json", json.dumps(report, indent=1, default=str)),
                     ("plan.md", markdown(report))):
    path = base / name
    tmp = base / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def _console(report: dict) -> str:
  """A plain-text table for the terminal."""
  cols = [("program", 44), ("batch", 6), ("GiB/chip", 8), ("of HBM", 7), ("fits", 4),
          ("compile s", 9), ("TFLOP÷analytic", 14)]
  lines = ["  ".join(f"{c:<{w}}" for c, w in cols)]
  for r in report["rows"]:
    total = f"{r['total_gib']:.2f}" if r.get("compiled") else "> HBM"
    share = f"{r['hbm_fraction'] * 100:.0f} %" if r.get("compiled") else "-"
    ratio = _fmt(r.get("compiled_over_analytic"), ".3f")
    lines.append("  ".join([
        f"{r['title'][:44]:<44}", f"{r['batch']:<6}", f"{total:<8}", f"{share:<7}",
        f"{('yes' if r['fits'] else 'NO'):<4}", f"{r['compile_s']:<9.0f}", f"{ratio:<14}"]))
  for sr in report["searches"]:
    lines.append(f"largest batch that fits, {sr['title']}: {sr['max_batch']} "
                 f"(first that does not: {sr['first_failing']})")
  return "\n".join(lines)


# ------------------------------------------------------------------ the plan


def _config_name(config, kind: str) -> str:
  if kind == "sfd":
    return f"SFD {config.model.variant}"
  if kind == "encode":
    return "encode"
  return {"semvae": "Semantic VAE", "texture_vae": "texture VAE"}[kind]


def _fit_problem(row: dict, program: programs_lib.Program, search: dict | None,
                 topology: tpu.Topology, capacity: float) -> str:
  """The one line for a program that does not fit at the configured settings."""
  need = row.get("total_gib") if row.get("compiled") else row.get("required_temp_gib")
  given = " ".join([f"{program.batch_field}={program.batch}"] +
                   [f"{k}={v!r}" for k, v in program.fields.items()])
  flag = program.batch_field.split(" ")[0]
  per_device = program.name == "encode"          # its field counts images per chip
  best = search.get("max_batch") if search else None
  fixes = []
  if best:
    value = best // program.batch_unit if per_device else best
    fixes.append(f"--{flag}={value} (the largest that fits)")
  else:
    fixes.append(f"a smaller --{flag}")
  if program.name == "train":
    if program.settings.get("remat") != "full":
      fixes.append("--config.model.remat_policy=full")
    fixes.append("--config.optimizer.accumulate_steps=k (the batch in k parts)")
  fixes.append("more chips (--config.plan.topology)")
  what = "needs" if row.get("compiled") else "asks the compiler for"
  return (f"{program.title} does not fit {topology.label}: {given} {what} "
          f"{need or float('nan'):.2f} GiB per chip of {capacity:.2f} GiB; set "
          f"{', or '.join(fixes)}")


def make_plan(config, workdir: str) -> dict[str, Any]:
  """Compiles the config's programs for ``config.plan.topology``; writes ``plan.json``
  and ``plan.md`` into ``workdir``; returns the report (see the module doc)."""
  kind = programs_lib.config_kind(config)
  s = settings(config, kind)
  topology = tpu.parse_topology(s.topology, s.num_slices)
  devices = tpu.devices(topology)
  capacity = s.hbm_gib or USABLE_HBM_GIB[topology.chip.generation]
  chips = len(devices)
  report: dict[str, Any] = {
      "config": _config_name(config, kind), "kind": kind,
      "topology": {"name": topology.name, "label": topology.label, "chips": chips,
                   "num_slices": topology.num_slices, "chip": topology.chip.name,
                   "device_kind": devices[0].device_kind,
                   "nominal_hbm_gib": topology.chip.hbm_gib,
                   "hosts": programs_lib.hosts(devices)},
      "capacity_gib": capacity, "versions": _versions(), "settings": dataclasses.asdict(s),
      "rows": [], "searches": [], "problems": [], "complete": False,
      "notes": [
          "HBM per chip from the compiled program's memory analysis: live total = "
          "arguments + outputs − aliased (donated) + temporaries; 'of HBM' against the "
          "HBM the TPU compiler makes available per chip.",
          "matmul TFLOP: dots and convolutions of the optimized per-chip program, loops "
          "counted with their trip counts, times the chips; ÷ analytic: against the model "
          "FLOPs of one call (train step: 3 × forward; remat recomputation makes it > 1; "
          "sampling: one velocity evaluation, so the ratio counts evaluations).",
          "collectives: per call of the program and per chip, count × result bytes "
          "(async pairs once); loops counted with their trip counts.",
          "Nothing was allocated or run: the TPU compiler compiled the programs with "
          "abstract inputs; step times need the hardware."]}
  _write(workdir, report)
  built: list[programs_lib.Program] = []
  if "train" in s.programs:
    remats = list(s.remat_policies) or [str(config.model.remat_policy)]
    built += programs_lib.dit_train_programs(config, devices, remats)
  if "sample" in s.programs:
    built.append(programs_lib.sample_program(config, devices, s))
  if "vae_train" in s.programs:
    built.append(programs_lib.vae_program(config, devices, kind, s))
  if "encode" in s.programs:
    built.append(programs_lib.encode_program(config, devices))

  for program in built:
    rows: dict[int, dict] = {}

    def compile_at(b, program=program):
      row = compile_row(program, b, chips=chips, capacity_gib=capacity)
      report["rows"].append(row)
      _write(workdir, report)
      logging.info("plan: %s at batch %d: %s", program.title, b,
                   f"{row['total_gib']:.2f} GiB per chip, compiled in "
                   f"{row['compile_s']:.0f} s" if row.get("compiled") else
                   f"rejected ({row.get('required_temp_gib')} GiB asked)")
      return row

    wanted = list(s.batch_sizes) if program.name in ("train", "vae_train") else []
    for b in wanted or [program.batch]:
      try:
        rows[b] = compile_at(b)
      except PlanError as e:
        report["problems"].append(str(e))
        _write(workdir, report)
    search = None
    if not rows:          # it could not be built at its configured batch (problem noted)
      continue
    if program.searchable and s.search_max_batch:
      search = search_max_batch(program, rows, compile_at, s, capacity)
      report["searches"].append(search)
      _write(workdir, report)
    configured = rows.get(program.batch)
    remat_ok = program.name != "train" or not s.remat_policies or (
        program.settings.get("remat") == str(config.model.remat_policy))
    if configured is not None and not configured["fits"] and remat_ok:
      report["problems"].append(_fit_problem(configured, program, search, topology,
                                             capacity))

  _attention_effect(config, devices, s, report, capacity, chips, workdir)
  report["complete"] = True
  _write(workdir, report)
  print(_console(report))
  logging.info("plan: wrote %s and %s", os.path.join(workdir, "plan.json"),
               os.path.join(workdir, "plan.md"))
  if report["problems"]:
    more = len(report["problems"]) - 1
    raise PlanError(report["problems"][0] + (f" (and {more} more problem(s) in plan.md)"
                                             if more else "") +
                    f"; report: {os.path.join(workdir, 'plan.md')}")
  return report


def _attention_effect(config, devices, s: Settings, report, capacity, chips, workdir):
  """With the splash kernel chosen for the train step, compile the configured step with
  ``attention_baseline`` too and state the HBM difference."""
  first = next((r for r in report["rows"] if r["program"] == "train" and r.get("compiled")
                and r["batch"] == int(config.batch_size)), None)
  if first is None or first.get("attention") != "splash" or not s.attention_baseline:
    return
  base = programs_lib.dit_train_programs(config, devices, [first["remat"]],
                                         attention=s.attention_baseline)[0]
  row = compile_row(base, first["batch"], chips=chips, capacity_gib=capacity)
  row["baseline"] = True
  report["rows"].append(row)
  if row.get("compiled"):
    diff = first["total_gib"] - row["total_gib"]
    text = (f"The train step uses the splash kernel (attention_impl "
            f"{config.model.attention_impl or 'auto'}): {first['total_gib']:.2f} GiB per chip "
            f"at batch {first['batch']} (remat {first['remat']}) against "
            f"{row['total_gib']:.2f} GiB with '{s.attention_baseline}' attention "
            f"({diff:+.2f} GiB, temporaries {first['temp_gib'] - row['temp_gib']:+.2f} GiB).")
  else:
    text = (f"The train step uses the splash kernel: {first['total_gib']:.2f} GiB per chip "
            f"at batch {first['batch']}; with '{s.attention_baseline}' attention the "
            f"compiler rejects it ({row.get('required_temp_gib')} GiB of temporaries asked).")
  report["attention"] = {"splash_gib": first["total_gib"], "baseline": s.attention_baseline,
                         "baseline_gib": row.get("total_gib"), "text": text}
  _write(workdir, report)
