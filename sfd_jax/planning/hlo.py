"""What a compiled program does per step, read from its optimized HLO text.

``analyze(text)`` parses the per-device module (``compiled.as_text()``) into its
computations and counts, with how often each computation runs per call of the program:

* **collectives** by kind (all-gather, all-reduce, reduce-scatter, all-to-all,
  collective-permute, ragged-all-to-all): executions and bytes per device (the size of
  each op's result, i.e. what lands on the device; async pairs are counted once, at
  their ``-done``);
* **matmul FLOPs**: every ``dot`` and ``convolution`` (TPU programs express dots as
  convolutions inside fusions), 2 × multiply-adds, with padding and dilation of
  convolution windows taken into account — the same quantity ``bench``'s analytic count
  models (matrix products only);
* **arrays with a given leading shape** (``leading_dims``) and more elements behind it,
  e.g. ``[global batch, tokens, width]`` in a program whose batch should be split over
  the devices.

How often: the entry computation runs once; a ``while`` body runs its trip count times:
XLA's ``known_trip_count`` when the loop carries one, else read from the loop condition
``counter < constant`` with the counter's start (from the initial tuple) and step (from
the body's ``counter + k``; ``lax.scan``/``fori_loop`` and XLA's windowed-einsum loops
have that form); a loop whose bound is not a constant (an adaptive ODE solver) counts
once and is reported in ``unknown_trip_loops``. Branches of
a ``conditional`` count once each (an upper bound). Fusions, calls and async wrappers
run once per execution of their caller. XLA's own ``cost_analysis()`` counts every
loop body once, hence this module.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all", "collective-broadcast")

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
               "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLEES = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OPERANDS_START = re.compile(r"\s([a-z][\w\-]*)\(")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str                # the result type text (array or tuple)
  operands: list[str]
  attrs: str
  root: bool = False


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: list[Instruction]

  def by_name(self) -> dict[str, Instruction]:
    return {i.name: i for i in self.instructions}


def _split_top(text: str, sep: str = ",") -> list[str]:
  """Splits at ``sep`` outside (), [], {}."""
  out, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == sep and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    out.append("".join(cur))
  return out


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  # rest = "<type> <opcode>(<operands>), attrs"; the type may be a tuple "( ... )".
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):  # noqa: B007  (i is the closing position, read below)
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, tail = rest[:i + 1], rest[i + 1:]
  else:
    sp = rest.find(" ")
    shape, tail = rest[:sp], rest[sp:]
  om = _OPERANDS_START.match(tail)
  if not om:
    return None
  opcode = om.group(1)
  start = om.end()
  depth = 1
  j = start
  while j < len(tail) and depth:
    depth += tail[j] == "("
    depth -= tail[j] == ")"
    j += 1
  operand_text, attrs = tail[start:j - 1], tail[j:]
  operands = []
  for op in _split_top(operand_text):
    op = op.strip()
    if not op:
      continue
    ref = op.split()[-1]
    operands.append(ref.lstrip("%"))
  return Instruction(name, opcode, shape, operands, attrs, root)


def parse(text: str) -> dict[str, Computation]:
  """Computations of an HLO module's text, by name."""
  comps: dict[str, Computation] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line.strip())
      if m and not line.startswith(" "):
        current = Computation(m.group(2), bool(m.group(1)), [])
      continue
    if line.strip() == "}":
      comps[current.name] = current
      current = None
      continue
    ins = _parse_instruction(line)
    if ins is not None:
      current.instructions.append(ins)
  return comps


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a result type (an array or a tuple of them)."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(shape) if dt in DTYPE_BYTES]


def nbytes(shape: str) -> float:
  return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays(shape))


def _callees(ins: Instruction) -> list[str]:
  out = _CALLEES.findall(ins.attrs)
  for group in _BRANCHES.findall(ins.attrs):
    out += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
  return out


def _resolve(table: dict[str, Instruction], ref: str) -> Instruction | None:
  """The instruction ``ref`` names, through copies, bitcasts and converts."""
  ins = table.get(ref)
  while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
    ins = table.get(ins.operands[0])
  return ins


def _unwrap(ins: Instruction | None, table: dict[str, Instruction],
            comps: dict[str, "Computation"], opcode: str) -> tuple[str, list] | None:
  """(opcode attrs, operand instructions) of ``ins`` if it is ``opcode``, or a fusion
  whose root is ``opcode`` of its parameters (XLA:CPU wraps scalar ops so)."""
  if ins is None:
    return None
  if ins.opcode == opcode:
    return ins.attrs, [_resolve(table, r) for r in ins.operands]
  if ins.opcode != "fusion":
    return None
  callee = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
  comp = comps.get(callee.group(1)) if callee else None
  root = next((i for i in comp.instructions if i.root), None) if comp else None
  if root is None or root.opcode != opcode:
    return None
  inner = comp.by_name()
  outer = []
  for ref in root.operands:
    param = inner.get(ref)
    if param is None or param.opcode != "parameter" or not param.operands:
      return None
    k = int(param.operands[0])
    outer.append(_resolve(table, ins.operands[k]) if k < len(ins.operands) else None)
  return root.attrs, outer


def _const(ins: Instruction | None) -> int | None:
  if ins is None or ins.opcode != "constant" or not ins.operands:
    return None
  m = re.match(r"\s*(-?\d+)\s*$", ins.operands[0])
  return int(m.group(1)) if m else None


def _tuple_index(ins: Instruction | None) -> int | None:
  if ins is None or ins.opcode != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", ins.attrs)
  return int(m.group(1)) if m else None


def _loop_bound(cond: Computation | None,
                comps: dict[str, Computation]) -> tuple[int, int] | None:
  """(counter's tuple index, exclusive bound N) of a condition ``counter < N`` (also
  ``<=``, ``>``, ``>=`` with the constant on either side)."""
  if cond is None:
    return None
  table = cond.by_name()
  root = next((i for i in cond.instructions if i.root), None)
  found = _unwrap(root, table, comps, "compare")
  if found is None or len(found[1]) != 2:
    return None
  attrs, (a, b) = found
  direction = re.search(r"direction=(\w+)", attrs)
  direction = direction.group(1) if direction else ""
  if _const(b) is not None and _tuple_index(a) is not None:
    idx, n, counter_left = _tuple_index(a), _const(b), True
  elif _const(a) is not None and _tuple_index(b) is not None:
    idx, n, counter_left = _tuple_index(b), _const(a), False
  else:
    return None
  if (direction, counter_left) in (("LT", True), ("GT", False)):
    return idx, n
  if (direction, counter_left) in (("LE", True), ("GE", False)):
    return idx, n + 1
  return None


def _trip_count(loop: Instruction, table: dict[str, Instruction],
                comps: dict[str, Computation]) -> int | None:
  """Iterations of a ``while``: bound from the condition, the counter's start from the
  loop's initial tuple (0 when not a constant) and its step from the body's update
  (``counter + k``; 1 when not readable)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", loop.attrs)
  body = re.search(r"body=%?([\w.\-]+)", loop.attrs)
  bound = _loop_bound(comps.get(cond.group(1)), comps) if cond else None
  if bound is None:
    return None
  idx, n = bound
  start = 0
  init = _resolve(table, loop.operands[0]) if loop.operands else None
  if init is not None and init.opcode == "tuple" and idx < len(init.operands):
    start = _const(_resolve(table, init.operands[idx])) or 0
  step = 1
  body_comp = comps.get(body.group(1)) if body else None
  if body_comp is not None:
    btable = body_comp.by_name()
    root = next((i for i in body_comp.instructions if i.root), None)
    if root is not None and root.opcode == "tuple" and idx < len(root.operands):
      found = _unwrap(_resolve(btable, root.operands[idx]), btable, comps, "add")
      if found is not None and len(found[1]) == 2:
        x, y = found[1]
        k = _const(y) if _tuple_index(x) == idx else (
            _const(x) if _tuple_index(y) == idx else None)
        if k is not None and k > 0:
          step = k
  return max(0, -(-(n - start) // step))


def executions(comps: dict[str, Computation]) -> tuple[dict[str, float], list[str]]:
  """How often each computation runs per call of the entry computation, and the loops
  whose trip count is unknown (counted once)."""
  entry = next((c for c in comps.values() if c.entry), None)
  if entry is None:
    raise ValueError("HLO text without an ENTRY computation")
  calls: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  unknown = []
  for comp in comps.values():
    table = comp.by_name()
    for ins in comp.instructions:
      if ins.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", ins.attrs)
        cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
        n = _trip_count(ins, table, comps)
        if n is None:
          unknown.append(ins.name)
        if body:
          calls[comp.name].append((body.group(1), float(1 if n is None else n)))
        if cond:
          calls[comp.name].append((cond.group(1), float(1 if n is None else n + 1)))
        continue
      for callee in _callees(ins):
        calls[comp.name].append((callee, 1.0))
  counts: dict[str, float] = collections.defaultdict(float)

  # computations form a DAG; accumulate in topological order from the entry
  order, seen = [], set()

  def visit(name):
    if name in seen or name not in comps:
      return
    seen.add(name)
    for callee, _ in calls.get(name, ()):
      visit(callee)
    order.append(name)

  visit(entry.name)
  counts[entry.name] = 1.0
  for name in reversed(order):
    for callee, mult in calls.get(name, ()):
      counts[callee] += counts[name] * mult
  return dict(counts), unknown


_REDUCTION_REGIONS = ("to_apply",)


def _window(attrs: str) -> dict[str, list]:
  m = re.search(r"window=\{([^}]*)\}", attrs)
  out: dict[str, list] = {}
  if not m:
    return out
  for part in m.group(1).split():
    key, _, value = part.partition("=")
    if key == "pad":
      out[key] = [tuple(int(x) for x in p.split("_")) for p in value.split("x")]
    elif key in ("size", "stride", "lhs_dilate", "rhs_dilate", "rhs_reversal"):
      out[key] = [int(x) for x in value.split("x")]
  return out


def _valid_taps(in_size: int, out_size: int, k: int, stride: int, pad_lo: int,
                lhs_dil: int, rhs_dil: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read a real
  input element (not padding, not a dilation hole)."""
  last = (in_size - 1) * lhs_dil
  total = 0
  for o in range(out_size):
    base = o * stride - pad_lo
    for t in range(k):
      p = base + t * rhs_dil
      if 0 <= p <= last and p % lhs_dil == 0:
        total += 1
  return total


def matmul_flops(ins: Instruction, table: dict[str, Instruction]) -> float:
  """2 × multiply-adds of a ``dot`` or ``convolution`` (0 for anything else)."""
  if ins.opcode not in ("dot", "convolution"):
    return 0.0
  out = arrays(ins.shape)
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])
  if ins.opcode == "dot":
    lhs = table.get(ins.operands[0]) if ins.operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    if lhs is None or not m or not arrays(lhs.shape):
      return 0.0
    dims = arrays(lhs.shape)[0][1]
    k = math.prod(dims[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * out_elems * k
  labels = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", ins.attrs)
  if not labels or len(ins.operands) < 2:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs = table.get(ins.operands[0]), table.get(ins.operands[1])
  if lhs is None or rhs is None or not arrays(lhs.shape) or not arrays(rhs.shape):
    return 0.0
  lhs_s, rhs_s, out_s = arrays(lhs.shape)[0][1], arrays(rhs.shape)[0][1], out[0][1]
  win = _window(ins.attrs)
  spatial = sorted(c for c in rhs_l if c.isdigit())
  taps = 1
  for i, d in enumerate(spatial):
    k = rhs_s[rhs_l.index(d)]
    taps *= _valid_taps(
        lhs_s[lhs_l.index(d)], out_s[out_l.index(d)], k,
        (win.get("stride") or [1] * len(spatial))[i],
        (win.get("pad") or [(0, 0)] * len(spatial))[i][0],
        (win.get("lhs_dilate") or [1] * len(spatial))[i],
        (win.get("rhs_dilate") or [1] * len(spatial))[i])
  batch = out_s[out_l.index("b")]
  feat = out_s[out_l.index("f")]
  return 2.0 * batch * feat * rhs_s[rhs_l.index("i")] * taps


@dataclasses.dataclass
class Analysis:
  """Per-device totals of one call of a compiled program (see the module doc)."""
  collectives: dict[str, dict[str, float]]   # kind -> {"count", "bytes", "ops"}
  matmul_flops: float
  unknown_trip_loops: int
  custom_calls: dict[str, int]                # target -> static count (kernels)
  leading_matches: int = 0                    # instructions with the asked leading dims
  leading_examples: list[str] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def analyze(text: str, leading_dims: Iterable[tuple[int, ...]] = ()) -> Analysis:
  """Collectives, matmul FLOPs and custom calls per call of the program (per device);
  ``leading_dims``: count array results whose shape starts with one of these."""
  comps = parse(text)
  counts, unknown = executions(comps)
  coll: dict[str, dict[str, float]] = {}
  flops = 0.0
  custom: dict[str, int] = collections.Counter()
  leading = [tuple(d) for d in leading_dims]
  matches, examples = 0, []
  for comp in comps.values():
    n = counts.get(comp.name, 0.0)
    table = comp.by_name()
    for ins in comp.instructions:
      op = ins.opcode
      base = op[:-5] if op.endswith("-done") else op
      if base in COLLECTIVES and not op.endswith("-start"):
        entry = coll.setdefault(base, {"count": 0.0, "bytes": 0.0, "ops": 0})
        entry["count"] += n
        entry["bytes"] += n * nbytes(ins.shape)
        entry["ops"] += 1
      elif op in ("dot", "convolution") and n:
        flops += n * matmul_flops(ins, table)
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        custom[target.group(1) if target else "?"] += 1
      if leading and op not in ("parameter", "get-tuple-element", "tuple", "bitcast"):
        for _, dims in arrays(ins.shape):
          if any(len(dims) > len(lead) and dims[:len(lead)] == lead and
                 math.prod(dims[len(lead):]) > 1 for lead in leading):
            matches += 1
            if len(examples) < 5:
              examples.append(f"{comp.name}/{ins.name}: {ins.shape.split('{')[0]}")
            break
  return Analysis(coll, flops, len(unknown), dict(custom), matches, examples)
