"""The parts of --mode=plan that need no TPU compiler: the optimized-HLO reader
(sfd_jax.planning.hlo: loop trip counts, collectives, matmul FLOPs, whole-batch arrays),
the largest-batch search, topology names and config.plan checks."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from sfd_jax.planning import hlo, plan, programs, tpu

# A hand-written per-device module: a loop counter stepping by 2 up to 8 (4 trips) whose
# body does a dot and an async all-reduce; an all-gather, a padded convolution and a
# conditional outside it.
MODULE = """HloModule test, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(8)
  ROOT %lt = pred[] compare(%gte, %limit), direction=LT
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p.1), index=0
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %xb = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %w = f32[16,16]{1,0} parameter(1)
  %d = f32[8,16]{1,0} dot(%xb, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ars = f32[8,16]{1,0} all-reduce-start(%d), replica_groups={}, to_apply=%add
  %ard = f32[8,16]{1,0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%next, %ard)
}

%branch_a (q: f32[8,16]) -> f32[8,16] {
  %q = f32[8,16]{1,0} parameter(0)
  ROOT %cp = f32[8,16]{1,0} collective-permute(%q), source_target_pairs={{0,1},{1,0}}
}

%branch_b (q.1: f32[8,16]) -> f32[8,16] {
  ROOT %q.1 = f32[8,16]{1,0} parameter(0)
}

ENTRY %main (a: f32[8,16], img: f32[1,8,4], k: f32[3,4,16], flag: s32[]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %img = f32[1,8,4]{2,1,0} parameter(1)
  %k = f32[3,4,16]{2,1,0} parameter(2)
  %flag = s32[] parameter(3)
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[8,16]{1,0}) tuple(%zero, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body
  %ag = f32[32,16]{1,0} all-gather(%a), dimensions={0}, replica_groups={}
  %conv = f32[1,8,16]{2,1,0} convolution(%img, %k), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
  %big = f32[24,16,64]{2,1,0} broadcast(%flag), dimensions={}
  %c = f32[8,16]{1,0} conditional(%flag, %a, %a), branch_computations={%branch_a, %branch_b}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_trip_counts_collectives_and_flops_of_a_module():
  a = hlo.analyze(MODULE, leading_dims=[(24, 16)])
  # 4 trips (0, 2, 4, 6) of the body: its all-reduce once per trip (start/done once)
  assert a.collectives["all-reduce"]["count"] == 4
  assert a.collectives["all-reduce"]["bytes"] == 4 * 8 * 16 * 4
  assert a.collectives["all-gather"] == {"count": 1, "bytes": 32 * 16 * 4, "ops": 1}
  assert a.collectives["collective-permute"]["count"] == 1      # a branch: counted once
  dot = 2 * 8 * 16 * 16
  conv = 2 * 1 * 16 * 4 * (8 * 3 - 2)   # 3 taps per output minus the 2 reading padding
  assert a.matmul_flops == 4 * dot + conv
  assert a.unknown_trip_loops == 0
  assert a.leading_matches == 1 and "f32[24,16,64]" in a.leading_examples[0]


def test_a_loop_without_a_constant_bound_counts_once():
  text = MODULE.replace("%limit = s32[] constant(8)", "%limit = s32[] parameter(1)")
  a = hlo.analyze(text)
  assert a.unknown_trip_loops == 1
  assert a.collectives["all-reduce"]["count"] == 1


def test_scan_of_a_real_compiled_program():
  """XLA's own output (CPU): a 7-step scan of a [4, 32] @ [32, 32] dot."""
  def f(x, ws):
    def body(h, w):
      return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, ws)[0]

  x = jax.ShapeDtypeStruct((4, 32), jnp.float32)
  ws = jax.ShapeDtypeStruct((7, 32, 32), jnp.float32)
  text = jax.jit(f).lower(x, ws).compile().as_text()
  a = hlo.analyze(text)
  assert a.matmul_flops == pytest.approx(7 * 2 * 4 * 32 * 32)
  assert a.unknown_trip_loops == 0


def test_array_shapes_of_a_result_type():
  assert hlo.arrays("(bf16[2,3]{1,0}, u32[], f32[5]{0})") == [
      ("bf16", (2, 3)), ("u32", ()), ("f32", (5,))]
  assert hlo.nbytes("(bf16[2,3]{1,0}, s32[4])") == 2 * 3 * 2 + 4 * 4


def _program(batch=256, unit=8):
  return programs.Program(name="train", title="t", batch=batch, batch_field="config.batch_size",
                          batch_unit=unit, lower=None, settings={"remat": "none"})


def _settings(**kw):
  return plan.Settings(**{**plan.DEFAULTS, "programs": ("train",), "batch_sizes": (),
                          "remat_policies": (), **kw})


@pytest.mark.parametrize("per_row,fixed,cap,want", [
    (0.1, 1.3, 95.74, 944),      # XL-like on v5p: fits up to (95.74 - 1.3) / 0.1 = 944.4
    (0.1, 1.3, 15.75, 144),      # the same on v5e: 144.5 -> 144 (multiple of 8)
    (0.5, 2.0, 15.75, 24),       # nothing fits at 256: halves, then extrapolates down
])
def test_search_finds_the_largest_batch_with_few_compiles(per_row, fixed, cap, want):
  """A linear memory model (what the compiled steps show): the search brackets the
  boundary within the tolerance and the batch it reports fits."""
  compiled = []

  def compile_at(b):
    compiled.append(b)
    total = fixed + per_row * b
    fits = total <= cap
    row = {"fits": fits, "compiled": fits, "total_gib": total, "temp_gib": total - fixed}
    if not fits:   # the compiler rejects it, saying what it asked for
      row = {"fits": False, "compiled": False, "required_temp_gib": total - fixed}
    return row

  s = _settings(search_compiles=6, search_tolerance=0.05)
  out = plan.search_max_batch(_program(), {}, compile_at, s, cap)
  best = max(b for b in compiled if fixed + per_row * b <= cap)
  assert out["max_batch"] == best and best % 8 == 0
  assert want * 0.95 <= best <= want
  assert out["first_failing"] - best <= max(8, 0.05 * best) + 8
  assert out["compiles"] == len(compiled) <= 6


def test_topology_names():
  t = tpu.parse_topology("v5p:2x2x4", 2)
  assert (t.chips, t.chip.device_kind, t.label) == (32, "TPU v5", "v5p:2x2x4 x2 slices")
  assert tpu.parse_topology(" v6e : 4x4 ").name == "v6e:4x4"
  for bad, text in [("v5e:2x2x2", "TPU v5e slices have 2 dimensions"),
                    ("tpu-v5p-8", "expected GENERATION:AxB[xC]"),
                    ("v9:2x2", "unknown TPU generation 'v9'")]:
    with pytest.raises(tpu.PlanError, match=text.replace("[", r"\[").replace("]", r"\]")):
      tpu.parse_topology(bad)
  with pytest.raises(tpu.PlanError, match="num_slices must be an integer >= 1"):
    tpu.parse_topology("v5e:2x2", 0)


def test_plan_settings_are_checked():
  config = ml_collections.ConfigDict({"plan": dict(plan.DEFAULTS)})
  assert plan.settings(config, "sfd").programs == ("train", "sample")
  assert plan.settings(config, "encode").programs == ("encode",)
  config.plan.batch_sizes = "256, 512"
  assert plan.settings(config, "sfd").batch_sizes == (256, 512)
  config.plan.programs = "encode"
  with pytest.raises(tpu.PlanError, match=r"\['encode'\] are not programs of this config"):
    plan.settings(config, "sfd")
  config.plan.programs = "auto"
  config.plan.batch_sizes = "256,x"
  with pytest.raises(tpu.PlanError, match="config.plan.batch_sizes='256,x'"):
    plan.settings(config, "sfd")
