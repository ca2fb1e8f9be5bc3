"""Helpers shared by the benchmark scripts.

* ``env_info``: what the numbers were measured on (machine, device kind and count, jax /
  jaxlib / flax versions), written into every report;
* ``PEAK_BF16_TFLOPS`` / ``device_peak_tflops``: dense bf16 peak per chip (docs/method.md §16);
* ``timed``: warm-up calls, then timed calls that each end in ``block_until_ready``;
* ``write_report``: one JSON file plus one markdown table per benchmark run.

Nothing here imports jax at module level, so a script can still set ``XLA_FLAGS``
(e.g. fake CPU devices) before jax starts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

# (substring of the lower-cased jax ``device_kind``, name, dense bf16 TFLOP/s per chip).
# First match wins, so the more specific strings come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("h100 pcie", "NVIDIA H100 PCIe", 756.0),
    ("h100 nvl", "NVIDIA H100 NVL", 835.0),
    ("h100", "NVIDIA H100 SXM", 989.0),
    ("h200", "NVIDIA H200", 989.0),
    ("h800", "NVIDIA H800", 989.0),
    ("a100", "NVIDIA A100", 312.0),
    ("v6 lite", "TPU v6e", 918.0),
    ("v6e", "TPU v6e", 918.0),
    ("v5 lite", "TPU v5e", 197.0),
    ("v5e", "TPU v5e", 197.0),
    ("v5p", "TPU v5p", 459.0),
    ("tpu v5", "TPU v5p", 459.0),
    ("tpu v4", "TPU v4", 275.0),
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of one chip in TFLOP/s, or None (CPU and unknown devices)."""
  kind = device_kind.lower()
  for key, _, peak in PEAK_BF16_TFLOPS:
    if key in kind:
      return peak
  return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def env_info(machine: str | None = None) -> dict[str, Any]:
  """Machine, devices and library versions (imports jax: call after setting XLA_FLAGS)."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  kind = devices[0].device_kind
  cpu = _cpu_model()
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "machine": machine or f"{len(devices)}x {kind} / {os.cpu_count()}-core {cpu}",
      "platform": platform.platform(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "backend": jax.default_backend(),
      "device_kind": kind,
      "num_devices": len(devices),
      "process_count": jax.process_count(),
      "peak_bf16_tflops_per_device": device_peak_tflops(kind),
  }


def timed(fn: Callable[[], Any], *, warmup: int, iters: int) -> list[float]:
  """Calls ``fn`` ``warmup`` times, then ``iters`` times; returns the timed durations
  (seconds). Each call's result is waited for with ``jax.block_until_ready``."""
  import jax  # pylint: disable=import-outside-toplevel

  if iters <= 0:
    raise ValueError(f"iters must be positive, got {iters}")
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def summarize(times: Sequence[float]) -> dict[str, float]:
  """Median / mean / min / max / standard deviation of a list of durations."""
  return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
          "min_s": min(times), "max_s": max(times),
          "std_s": statistics.pstdev(times) if len(times) > 1 else 0.0, "n": len(times)}


def parse_list(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
  """'a,b,c' -> [cast(a), cast(b), cast(c)] (empty items dropped)."""
  return [cast(x.strip()) for x in text.split(",") if x.strip()]


def add_output_args(parser: argparse.ArgumentParser) -> None:
  """--out, --tag and --machine, shared by every script."""
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help="directory for the JSON and markdown results (default: %(default)s)")
  parser.add_argument("--tag", default="",
                      help="file-name suffix (default: the device kind, e.g. "
                      "nvidia-h100-80gb-hbm3)")
  parser.add_argument("--machine", default=None,
                      help="how to name the machine in the report (default: devices and CPU)")


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(value: Any, fmt: str | None) -> str:
  if value is None:
    return "n/a"
  if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, fmt)
  return str(value)


def md_table(rows: Iterable[Mapping[str, Any]],
             columns: Sequence[tuple[str, str, str | None]]) -> str:
  """Markdown table; ``columns`` are (row key, header, format spec or None)."""
  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(k), f) for k, _, f in columns) + " |")
  return "\n".join(lines)


def env_line(env: Mapping[str, Any]) -> str:
  """One markdown line naming the machine, device and versions of a report."""
  return (f"Machine: {env['machine']}; device kind: {env['device_kind']} × "
          f"{env['num_devices']} ({env['backend']}); jax {env['jax']}, jaxlib "
          f"{env['jaxlib']}, flax {env['flax']}, Python {env['python']}; "
          f"{env['date_utc']} UTC.")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(value: Any) -> Any:
  """A setting as a report records it: an absolute path becomes relative to the repository
  when inside it, else ``.../<last part>`` (reports name no machine's directories)."""
  if isinstance(value, Mapping):
    return {k: portable(v) for k, v in value.items()}
  if not isinstance(value, str) or not os.path.isabs(value):
    return value
  path = os.path.normpath(value)
  if path == REPO or path.startswith(REPO + os.sep):
    return os.path.relpath(path, REPO)
  return ".../" + os.path.basename(path)


def write_report(name: str, title: str, rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str, str | None]], *, env: Mapping[str, Any],
                 settings: Mapping[str, Any], out_dir: str, tag: str = "",
                 notes: Sequence[str] = ()) -> tuple[str, str]:
  """Writes ``<out>/<name>_<tag>.json`` and ``.md``; prints the markdown; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{name}_{_slug(tag or env['device_kind'])}")
  with open(stem + ".json", "w") as f:
    json.dump({"benchmark": name, "title": title, "env": dict(env),
               "settings": portable(dict(settings)), "rows": list(rows),
               "notes": list(notes)},
              f, indent=1, default=str)
  md = [f"### {title}", "", env_line(env), "", md_table(rows, columns)]
  if notes:
    md += [""] + [f"- {n}" for n in notes]
  text = "\n".join(md) + "\n"
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text, flush=True)
  return stem + ".json", stem + ".md"


def log(msg: str) -> None:
  """Progress line on stderr with a wall-clock stamp."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
