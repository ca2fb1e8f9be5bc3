"""The facts about this machine that decide XLA:CPU's float rounding.

XLA:CPU compiles for the host: LLVM picks the target CPU from the vendor, family and model
(its tuning, e.g. the preferred vector width) and the instruction-set extensions, and the
runtime splits work (dot contractions among them) over a thread pool sized by the usable
cores. Two machines that differ in any of these may compile the same program into code
that sums in another order, so a float32 result is only reproducible *bit for bit* on a
machine with the same facts; elsewhere it agrees to float32 rounding.

``machine_facts()`` records them (fixtures store it in their provenance);
``same_machine(recorded)`` tells whether this machine matches a recorded one.
"""
from __future__ import annotations

import os
import platform

# Instruction-set extensions that change XLA:CPU's generated code (vector width, FMA
# contraction, bf16/fp16/int8 dot instructions, AMX tiles).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512cd",
             "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "avx512vbmi", "avx512_vbmi2", "avx512ifma", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sve2")


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (Linux; {} elsewhere)."""
  out: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          if out:
            break
          continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return out


def machine_facts() -> dict:
  """vendor, family, model, model name, the ISA extensions of ``ISA_FLAGS`` present, the
  usable cores and the architecture (JSON-serialisable)."""
  info = _cpuinfo()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 0
  return {
      "arch": platform.machine(),
      "vendor_id": info.get("vendor_id") or info.get("CPU implementer", ""),
      "cpu_family": info.get("cpu family", ""),
      "model": info.get("model") or info.get("CPU part", ""),
      "model_name": info.get("model name", ""),
      "isa": sorted(f for f in ISA_FLAGS if f in flags),
      "cores": cores,
  }


def same_machine(recorded: dict | None) -> bool:
  """True when ``recorded`` (a ``machine_facts()`` of another run) names this machine's
  facts exactly; a missing or partial record is never the same machine."""
  if not recorded:
    return False
  here = machine_facts()
  return all(k in recorded and recorded[k] == v for k, v in here.items())


def describe(facts: dict | None) -> str:
  """One line for messages: a full record as 'vendor name family/model, cores, ISA', a
  partial one field by field."""
  if not facts:
    return "not recorded"
  if not all(k in facts for k in ("vendor_id", "model_name", "cpu_family", "model", "cores",
                                  "isa")):
    return "partial record: " + ", ".join(f"{k}={v}" for k, v in facts.items())
  return (f"{facts['vendor_id']} {facts['model_name']!r} family {facts['cpu_family']} model "
          f"{facts['model']}, {facts['cores']} cores, {' '.join(facts['isa'])}")
