"""Every config field is declared once (sfd_jax/core/options.py) and docs/options.md is
generated from the declarations.

* every field of every config file under configs/, for each of its options that change
  the field set, has a declaration (and its value is allowed);
* docs/options.md is what ``python -m sfd_jax.core.options`` writes;
* choices written out in the declarations are those the code accepts;
* bad values are refused with one line naming the field, the value and what is allowed.
"""
import importlib
import sys

import pytest

from sfd_jax.core import options, trees
from sfd_jax.core.errors import ConfigError
from tests.conftest import REPO

sys.path.insert(0, str(REPO))

# every config file with the get_config options that change its field set, and the
# family each variant belongs to
VARIANTS = {
    "tiny.py": [(None, "sfd")],
    "sfd_b.py": [(None, "sfd")],
    "sfd_xl.py": [(None, "sfd"), ("recipe=80ep", "sfd")],
    "sfd_xxl.py": [(None, "sfd")],
    "demo.py": [(None, "sfd"), ("fast=1", "sfd"), ("clocks=1", "sfd"), ("fewstep=1", "sfd")],
    "encode_imagenet.py": [(None, "encode"), ("source=tfds,split=val", "encode")],
    "semvae_ch16.py": [(None, "semvae")],
    "texture_vae_f16d32.py": [(None, "texture_vae")],
    "texture_vae_f16d32_ldm.py": [(None, "texture_vae")],
    "texture_vae_f16d32_vavae.py": [(None, "texture_vae"), ("vf_features=x", "texture_vae")],
    "tiny_vae.py": [("job=semvae", "semvae"), ("job=texture_vae", "texture_vae"),
                    ("job=texture_gan", "texture_vae"),
                    ("job=texture_gan,vf=features", "texture_vae"),
                    ("job=texture_gan,vf=dinov2", "texture_vae"), ("job=encode", "encode")],
}
NOT_CONFIGS = {"__init__.py", "common.py", "sweeps.py"}


def _config(name, arg):
  return importlib.import_module(f"configs.{name[:-3]}").get_config(arg)


def test_every_config_file_is_listed():
  files = {p.name for p in (REPO / "configs").glob("*.py")} - NOT_CONFIGS
  assert files == set(VARIANTS), ("list the new config file and the options that change "
                                   f"its fields in VARIANTS: {sorted(files ^ set(VARIANTS))}")


@pytest.mark.parametrize("name,arg,family",
                         [(n, a, f) for n, vs in VARIANTS.items() for a, f in vs])
def test_every_config_field_is_declared(name, arg, family):
  """Each field of the config (its trainers' sub-configs included) has a declaration in
  its family and an allowed value; the family is the one its sections say."""
  config = _config(name, arg)
  assert options.family_of(config) == family
  undeclared = []
  idx = options.index(family)
  nested = dict(options.FAMILIES[family].nested)
  for path in trees.flatten(config.to_dict(), "."):
    fam, rel = family, path
    for prefix, sub in nested.items():
      if path.startswith(prefix + "."):
        fam, rel = sub, path[len(prefix) + 1:]
    i = options.index(fam) if fam != family else idx
    field = i.field(rel)
    if field is None:       # a field inside a declared free-form section is fine
      parts = rel.split(".")
      if not any((f := i.field(".".join(parts[:k]))) is not None and f.type == options.MAPPING
                 for k in range(1, len(parts))):
        undeclared.append(path)
  assert not undeclared, f"fields without a declaration in {family}: {undeclared}"
  assert options.check(config) == family


def test_options_md_is_current():
  page = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
  assert page == options.markdown(str(REPO)), (
      "docs/options.md is stale: regenerate it with python -m sfd_jax.core.options > "
      "docs/options.md")


def test_every_reference_default_is_allowed():
  """The documented defaults pass their own declarations."""
  for family in options.FAMILIES:
    idx = options.index(family)
    for path, value in options.defaults(family, str(REPO)).items():
      assert idx.field(path).accepts(value), (family, path, value)


def test_declared_choices_match_the_code():
  """Choices written out in the declarations are those the code accepts."""
  from sfd_jax.checkpoint import export  # pylint: disable=import-outside-toplevel
  from sfd_jax.core import writers  # pylint: disable=import-outside-toplevel
  from sfd_jax.data import images, records  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion import clocks, generation, guidance, objective, samplers  # pylint: disable=import-outside-toplevel
  from sfd_jax.models import attention, dinov2, inception, lightning_dit, semantic_vae, texture_vae  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import gan_losses, optim, sfd, texture_gan  # pylint: disable=import-outside-toplevel
  from sfd_jax.metrics import features  # pylint: disable=import-outside-toplevel

  def choices(family, path):
    return set(options.index(family).field(path).choices)

  exact = [
      ("sfd", "model.variant", set(lightning_dit.VARIANTS) | {"1p0B", "custom"}),
      ("sfd", "model.remat_policy", set(lightning_dit.REMAT_POLICIES)),
      ("sfd", "objective.time_sampler", set(objective.TIME_SAMPLERS)),
      ("sfd", "objective.repa_mode", set(objective.REPA_MODES)),
      ("sfd", "schedule.parts.*.family", set(clocks.FAMILIES)),
      ("sfd", "optimizer.name", {"adamw"}),
      ("sfd", "optimizer.schedule", set(optim.SCHEDULES)),
      ("sfd", "init_from_mode", set(sfd.INIT_FROM_MODES)),
      ("sfd", "sample.guidance", set(guidance.GUIDANCE_MODES)),
      ("sfd", "sample.cfg_interval_mode", set(guidance.INTERVAL_MODES)),
      ("sfd", "sample.labels", set(generation.LABEL_MODES)),
      ("sfd", "sample.diffusion_form", set(samplers.DIFFUSION_FORMS)),
      ("sfd", "sample.last_step", set(generation.LAST_STEP_NAMES)),
      ("sfd", "eval.preprocess", set(inception.PREPROCESS_MODES)),
      ("sfd", "train_eval.features", set(features.FEATURE_KINDS) | {""}),
      ("sfd", "export.dtype", set(export.DTYPES)),
      ("sfd", "writer", set(writers.KINDS)),
      ("sfd", "sample.method", set(samplers.METHODS)),
      ("sfd", "train_eval.method", set(samplers.METHODS)),
      ("sfd", "model.attention_impl", set(attention.IMPLS) | {"", "auto"}),
      ("texture_vae", "loss.name", set(texture_gan.OBJECTIVES)),
      ("texture_vae", "loss.vf_source", set(texture_gan.VF_SOURCES)),
      ("texture_vae", "loss.step_counter", set(gan_losses.STEP_COUNTERS)),
      ("texture_vae", "data.source", set(images.SOURCE_KINDS)),
      ("texture_vae", "eval_tokenizer.texture_vae_preset", set(texture_vae.PRESETS)),
      ("encode", "encode.texture_vae_preset", set(texture_vae.PRESETS)),
      ("encode", "job.compression", set(records.COMPRESSIONS)),
  ]
  for family, path, code in exact:
    assert choices(family, path) == code, (family, path)
  for name in choices("encode", "encode.dinov2_preset"):
    dinov2.DinoV2Config.preset(name)
  for name in choices("encode", "encode.semvae_preset"):
    semantic_vae.SemVAEConfig.preset(name)


@pytest.mark.parametrize("override,expect", [
    (("num_train_steps", -5), ("config.num_train_steps must be an integer > 0, got -5",
                               "the number of optimizer steps")),
    (("objective.delta_t", 1.5), ("config.objective.delta_t must be a number in [0, 1], "
                                  "got 1.5",)),
    (("optimizer.accumulate_steps", 0), ("config.optimizer.accumulate_steps must be an "
                                         "integer > 0, got 0",)),
    (("model.variant", "XXXL"), ("config.model.variant must be one of", "got 'XXXL'")),
    (("export.formats", "orbax,zip"), ("config.export.formats must be a comma-separated "
                                       "subset of orbax, safetensors, npz, got 'orbax,zip'",)),
    (("validation.times", (0.1, 1.5)), ("config.validation.times", "each in [0, 1]",
                                        "(0.1, 1.5)")),
    (("sample.method", 3), ("config.sample.method must be one of", "got 3")),
    (("batch_size", 8.0), ("config.batch_size must be an integer > 0, got 8.0",)),
])
def test_bad_values_are_one_line(override, expect):
  config = _config("tiny.py", None)
  field, value = override
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError) as e:
    options.check(config)
  line = str(e.value)
  assert "\n" not in line
  for text in expect:
    assert text in line, line


def test_undeclared_fields_are_refused_with_a_suggestion():
  config = _config("tiny.py", None)
  config.model.unlock()
  config.model.hiden_size = 64
  with pytest.raises(ConfigError, match=r"config\.model\.hiden_size is not a field of an SFD "
                     r"config \(did you mean 'hidden_size'\?\)"):
    options.check(config)
  config = _config("demo.py", "fast=1")
  config.demo.semvae.data.unlock()
  config.demo.semvae.data.image_size = 16      # a SemVAE reads features, not images
  with pytest.raises(ConfigError, match=r"config\.demo\.semvae\.data\.image_size is not a "
                     "field of a SemVAE training config"):
    options.check(config)


def test_a_section_where_a_value_belongs():
  config = _config("tiny.py", None).to_dict()      # a config file may write anything
  config["batch_size"] = {"a": 1}
  with pytest.raises(ConfigError, match=r"config\.batch_size must be an integer > 0, got a "
                     "section"):
    options.check(config)


def test_rows_list_every_field_with_its_value():
  """The listing (for a help or config-printing mode): each field of a config once, with
  its value, type, what is allowed and its meaning."""
  config = _config("sfd_xl.py", None)
  rows = options.rows("sfd", config)
  by_path = {r.path: r for r in rows}
  flat = trees.flatten(config.to_dict(), ".")
  for path, value in flat.items():
    if path.startswith("compiler_options") or ".compiler_options" in path:
      continue
    assert path in by_path, path
    assert by_path[path].value == value, path
  r = by_path["optimizer.lr"]
  assert (r.type, r.allowed) == ("float", "> 0") and r.meaning
  assert by_path["objective.clock_energy_weight"].value is options.MISSING
  assert by_path["objective.clock_energy_weight"].absent == "0.1"
  demo = {r.path: r for r in options.rows("sfd", _config("demo.py", None))}
  assert demo["demo.texture_vae.model.ch"].value == 16


def test_sweeps_name_declared_fields():
  """The named sweeps of configs/sweeps.py override declared fields with allowed values."""
  from configs import sweeps  # pylint: disable=import-outside-toplevel
  idx = options.index("sfd")
  for name, spec in sweeps.SWEEPS.items():
    fields = dict(spec.get("base", {}))
    for f, values in spec.get("product", {}).items():
      for v in values:
        assert idx.field(f).accepts(v), (name, f, v)
    for run in spec.get("list", []):
      fields.update(run)
    for f, v in fields.items():
      assert idx.field(f) is not None and idx.field(f).accepts(v), (name, f, v)


def test_regenerating_needs_the_repository(tmp_path, capsys):
  assert options.main([str(REPO)]) == 0
  assert capsys.readouterr().out == (REPO / "docs" / "options.md").read_text(encoding="utf-8")
  with pytest.raises(ConfigError, match="has no configs/ folder"):
    options.main([str(tmp_path)])
