"""docs/scale.md: what fits on which TPU slice, from --mode=plan (the TPU compiler, no TPUs).

  python -m bench.scale                      # every job not done yet, then docs/scale.md
  python -m bench.scale --only XL:v5p:2x2x2  # one job
  python -m bench.scale --report             # rewrite docs/scale.md from the plans done

Each job is one ``python main.py --mode=plan`` run (a subprocess, ``nice``d) of an SFD
config on a topology, at the paper's global batch 256, for a list of remat policies,
with or without the largest-batch search; its ``plan.json`` / ``plan.md`` go to
``bench/results/scale/<variant>_<topology>/``. Finished jobs (a complete ``plan.json``)
are skipped, so an interrupted run resumes where it stopped, and the markdown is
rewritten after every job from whatever is done.

Jobs (``JOBS``, ``_jobs``): on v5e, v5p and v6e slices of 8 and 16 chips (v5p:2x2x2 and
v5e:4x4 first), the largest batch of XL without remat and of XXL with its config's
dots_no_batch, and with full remat on the 16 GiB v5e chips; B, XL full and XXL none / full
at batch 256.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

from bench import common

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "scale"
DOC = REPO / "docs" / "scale.md"
BATCH = 256


@dataclasses.dataclass(frozen=True)
class Job:
  variant: str
  topology: str
  remats: tuple[str, ...]
  search: bool
  programs: str = "train"
  baseline: str = ""          # compile the train step with this attention too

  @property
  def name(self) -> str:
    kind = "attention" if self.baseline else "search" if self.search else "table"
    return f"{self.variant}_{self.topology.replace(':', '_')}_{kind}"

  @property
  def config(self) -> str:
    return {"B": "configs/sfd_xl.py:variant=B", "XL": "configs/sfd_xl.py",
            "XXL": "configs/sfd_xxl.py"}[self.variant]


TOPOLOGIES = ("v5p:2x2x2", "v5e:4x4", "v6e:2x4", "v5e:2x4", "v5p:2x2x4", "v6e:4x4")
SMALL_HBM = ("v5e:2x4", "v5e:4x4")      # 16 GiB chips: where full remat decides what fits


def _jobs() -> tuple[Job, ...]:
  """Per topology (acceptance topologies first): the largest batch of XL without remat
  and of XXL with its config's dots_no_batch everywhere, of full remat on the 16 GiB
  chips; the other policies at batch 256 only."""
  jobs = []
  for t in TOPOLOGIES:
    small = t in SMALL_HBM
    jobs += [Job("XL", t, ("none", "full") if small else ("none",), True),
             Job("XXL", t, ("dots_no_batch", "full") if small else ("dots_no_batch",), True),
             Job("B", t, ("none",), t == "v5e:2x4")]
    table = {"XL": ("full",), "XXL": ("none", "full")} if not small else {"XXL": ("none",)}
    jobs += [Job(v, t, r, False) for v, r in table.items()]
  # the splash kernel against XLA attention, and the sampling program, for XL on v5p
  jobs.append(Job("XL", "v5p:2x2x2", ("none",), False, "train,sample", "xla"))
  return tuple(jobs)


JOBS = _jobs()


def run_job(job: Job, search_compiles: int, timeout: int) -> int:
  workdir = OUT / job.name
  cmd = ["nice", "-n", "10", sys.executable, "main.py", f"--config={job.config}",
         "--mode=plan", f"--workdir={workdir}", f"--config.plan.topology={job.topology}",
         f"--config.plan.programs={job.programs}", f"--config.batch_size={BATCH}",
         f"--config.plan.remat_policies={','.join(job.remats)}",
         f"--config.plan.search_max_batch={job.search}",
         f"--config.plan.search_compiles={search_compiles}",
         "--config.plan.search_tolerance=0.05",
         f"--config.plan.attention_baseline={job.baseline}"]
  common.log(f"{job.name}: {' '.join(cmd[3:])}")
  log = workdir.with_suffix(".log")
  workdir.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  with open(log, "w") as f:
    rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                        timeout=timeout).returncode
  common.log(f"{job.name}: exit {rc} after {time.time() - t0:.0f} s (log {log.name})")
  return rc


def _done(job: Job) -> dict | None:
  path = OUT / job.name / "plan.json"
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  return report if report.get("complete") else None


def _gib(v):
  return "–" if v is None else f"{v:.1f}"


def _coll(row) -> str:
  c = row.get("collectives") or {}
  short = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS",
           "collective-permute": "CP", "all-to-all": "A2A"}
  return ", ".join(f"{short.get(k, k)} {v['count']:.0f}×/{v['gib']:.1f}"
                   for k, v in sorted(c.items()) if v["count"]) or "–"


def write_doc(reports: list[dict]) -> None:
  """docs/scale.md from the finished plans."""
  versions = next((r["versions"] for r in reports), {})
  lines = [
      "# Scale: what fits on which TPU slice",
      "",
      "Produced by `python -m bench.scale`, which runs `python main.py --mode=plan` (the TPU "
      "compiler of libtpu, ahead of time on a CPU machine: `sfd_jax.planning`, "
      "`docs/options.md`) for the SFD ImageNet-256 configs (`configs/sfd_xl.py`, "
      "`configs/sfd_xl.py:variant=B`, `configs/sfd_xxl.py`: bf16 compute, f32 weights, "
      "scanned blocks, AdamW + EMA, FSDP over every chip, attention `auto` = the Pallas "
      "splash kernel on TPU). Each number is the TPU compiler's for one chip of the named "
      "slice; the plans (`plan.json`, `plan.md`) are in `bench/results/scale/`.",
      "",
      f"jax {versions.get('jax')}, libtpu {versions.get('libtpu')}; compiled on "
      f"{versions.get('compiled_on')}; most plans while other work shared the machine, so "
      "a compile time says little more than its order (one compile of a 16-chip step at "
      "batch 256: 30–60 s on the quiet machine, up to 890 s on the loaded one).",
      "",
      "HBM: live total per chip = arguments + outputs − aliased (the donated state) + "
      "temporaries, against what the TPU compiler makes available (v5e 15.75, v5p 95.74, "
      "v6e 31.25 GiB). A step the compiler rejects shows the temporaries it asked for. "
      "Collectives per step and chip: count × / GiB (AG all-gather, AR all-reduce, RS "
      "reduce-scatter, CP collective-permute — XLA's windowed einsums —, A2A all-to-all), "
      "loops counted with their trip counts. FLOP ratio: the compiled matmul FLOPs (all "
      "chips, loops with their trip counts) over the model FLOPs (3 × forward; full "
      "remat recomputes the forward, hence ≈ 1.33; the attention runs inside the splash "
      "kernel, which this count does not see: 3.5 % of XL's model FLOPs, 2.7 % of XXL's, "
      "4.9 % of B's).",
      "",
      f"## Global batch {BATCH}",
      "",
      "| model | remat | topology | chips | batch/chip | arguments GiB | temporaries GiB "
      "| live total GiB | of HBM | fits | compile s | FLOP ratio | collectives per step |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  order = {t: i for i, t in enumerate(TOPOLOGIES)}
  rows = []
  main = [rep for rep in reports if not rep["settings"].get("attention_baseline")]
  for rep in main:
    for r in rep["rows"]:
      if r["program"] == "train" and r["batch"] == BATCH:
        rows.append((rep, r))
  rows.sort(key=lambda x: (("B", "XL", "XXL").index(x[1]["variant"]), x[1]["remat"],
                           order.get(x[0]["topology"]["name"], 99)))
  for rep, r in rows:
    t = rep["topology"]
    if r.get("compiled"):
      lines.append(
          f"| {r['variant']} | {r['remat']} | {t['name']} | {t['chips']} "
          f"| {r['per_chip_batch']:g} | {_gib(r['argument_gib'])} | {_gib(r['temp_gib'])} "
          f"| {_gib(r['total_gib'])} | {r['hbm_fraction'] * 100:.0f} % "
          f"| {'yes' if r['fits'] else '**no**'} | {r['compile_s']:.0f} "
          f"| {r.get('compiled_over_analytic') or 0:.3f} | {_coll(r)} |")
    else:
      lines.append(
          f"| {r['variant']} | {r['remat']} | {t['name']} | {t['chips']} "
          f"| {r['per_chip_batch']:g} | – | {_gib(r.get('required_temp_gib'))} (asked) | – "
          f"| > 100 % | **no** | {r['compile_s']:.0f} | – | rejected by the compiler |")
  lines += ["", "## Largest global batch that fits", "",
            "Found by compiling (`config.plan.search_max_batch`): from batch 256, each next "
            "batch is where the line through the two measured batches nearest the "
            "boundary reaches the chip's HBM, until the largest batch that fits and the "
            "smallest that does not are within 5 %, or 3 more compiles are spent; 'first "
            "not fitting' is the smallest batch seen to fail (`–`: the compiles were spent "
            "on batches that fit, so the largest one is a lower bound; 'of HBM' says how "
            "close it is).", "",
            "| model | remat | topology | chips | largest fitting batch | per chip "
            "| its live total GiB | of HBM | first not fitting | compiles |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  searches = [(rep, s) for rep in main for s in rep.get("searches", [])]
  searches.sort(key=lambda x: (x[0]["config"], x[1]["remat"] or "",
                               order.get(x[0]["topology"]["name"], 99)))
  for rep, s in searches:
    t = rep["topology"]
    variant = rep["config"].split()[-1]
    fit = "none" if s["max_batch"] is None else str(s["max_batch"])
    per = "–" if s["per_chip_max_batch"] is None else f"{s['per_chip_max_batch']:g}"
    total = s.get("max_batch_total_gib")
    share = "–" if total is None else f"{total / rep['capacity_gib'] * 100:.0f} %"
    lines.append(f"| {variant} | {s['remat']} | {t['name']} | {t['chips']} | {fit} | {per} "
                 f"| {_gib(total)} | {share} "
                 f"| {s['first_failing'] if s['first_failing'] else '–'} | {s['compiles']} |")
  for rep in reports:
    if not rep["settings"].get("attention_baseline"):
      continue
    t = rep["topology"]
    lines += ["", f"## Attention kernel and sampling ({rep['config']}, {t['name']})", ""]
    if rep.get("attention"):
      lines.append(rep["attention"]["text"] + " The kernel keeps, for the backward pass, "
                   "the softmax statistics 128 lanes wide in float32 ([heads, T, 128] per "
                   "example and layer), which at 256 tokens outweighs the probabilities "
                   "the XLA path keeps; its matmuls run inside the Mosaic kernel, so the "
                   "FLOP ratio of that row leaves out the attention (3.5 % of XL's FLOPs).")
    lines += ["", "| program | batch | arguments GiB | temporaries GiB | live total GiB "
              "| compile s | FLOP ratio |", "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
      if r.get("compiled"):
        lines.append(f"| {r['title']} | {r['batch']} | {_gib(r['argument_gib'])} "
                     f"| {_gib(r['temp_gib'])} | {r['total_gib']:.2f} | {r['compile_s']:.0f} "
                     f"| {r.get('compiled_over_analytic') or 0:.3f} |")
    lines.append("")
    lines.append("Sampling: the configured dopri5 with autoguidance (the guide has B's "
                 "architecture) in float32, batch 64 over the 8 chips, weights replicated; "
                 "its FLOP ratio is not an evaluation count (diffrax's adaptive loop has no "
                 "fixed length and is counted once).")
  lines += ["", "## Reading it", "",
            "- Per-chip activations follow the batch share: at the same global batch, a "
            "16-chip slice holds half the batch rows per chip of an 8-chip slice of the "
            "same generation (the model pins the block states to the batch sharding; "
            "each plan's activation check found no array of the whole batch on a chip).",
            "- The state (f32 weights, EMA, Adam moments) is sharded over every chip, so "
            "its share shrinks with the chip count too; v5e's 15.75 GiB is what rules out "
            "the larger models there without remat.",
            "- Step times are not here: they need the hardware (`bench/train_step.py` on a "
            "TPU VM). The plan tells what compiles and fits, and what each step moves "
            "between chips.", ""]
  DOC.write_text("\n".join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated VARIANT:TOPOLOGY jobs")
  parser.add_argument("--report", action="store_true", help="only rewrite docs/scale.md")
  parser.add_argument("--search-compiles", type=int, default=3)
  parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per job")
  args = parser.parse_args(argv)
  jobs = list(JOBS)
  if args.only:
    want = set(common.parse_list(args.only))
    jobs = [j for j in jobs if f"{j.variant}:{j.topology}" in want or j.name in want]
  if not args.report:
    for job in jobs:
      if _done(job) is not None:
        common.log(f"{job.name}: done already")
        continue
      run_job(job, args.search_compiles, args.timeout)
      write_doc([r for r in (_done(j) for j in JOBS) if r is not None])
  write_doc([r for r in (_done(j) for j in JOBS) if r is not None])
  common.log(f"wrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
