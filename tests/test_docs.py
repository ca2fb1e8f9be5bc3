"""The repository speaks to its users: no reference to files they do not have (a "SPEC",
``../shared``), no absolute paths of the machine a file was written on, no text about the
circumstances in which the work was done; the README front page stays short, shows the
demo's picture and links to pages that exist. (Tests may read ``../shared/parity``.)"""
import re

import pytest

from tests.conftest import REPO

# What users get: everything but the tests (which read the parity outputs).
ROOTS = ["README.md", "CITATION.cff", "Makefile", "pyproject.toml", "requirements.txt",
         "main.py", "docs", "configs", "bench", "sfd_jax", "launch", "requirements", ".ci"]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".sh", ".sbatch", ".toml", ".cff", ".cfg",
                 ".yaml", ".yml", ""}

FORBIDDEN = {
    "a specification users do not have": re.compile(r"\bSPEC\b"),
    "a path outside the repository": re.compile(r"\.\./shared|shared/parity|shared/tools"),
    "an absolute path of a machine": re.compile(r"(?<![\w.])/(?:work|tmp|root|home)/"),
    "the circumstances of the work": re.compile(
        r"\b(?:this|in this|that|next|each) session\b|\bsessions?'|\bissues? \d+|"
        r"\bclosing notes\b|this project's \d-core|\bdevice tool\b|\bwas (?:not )?lent\b|"
        r"\bnot drawn\b|\bother engineers?\b|\bthe lead\b", re.I),
}


def _files():
  for root in ROOTS:
    path = REPO / root
    if path.is_file():
      yield path
    elif path.is_dir():
      for p in sorted(path.rglob("*")):
        if (p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
            and not p.name.endswith(".egg-info")):
          yield p


def test_the_checker_sees_the_files():
  names = {p.relative_to(REPO).as_posix() for p in _files()}
  assert {"README.md", "docs/method.md", "sfd_jax/cli.py", "configs/sfd_xl.py",
          "bench/results/memory_cpu8.json", "launch/tpu_pod.sh", ".ci/run"} <= names


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_no_text_users_cannot_follow(what):
  pattern = FORBIDDEN[what]
  hits = []
  for path in _files():
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(),
                             1):
      if pattern.search(line):
        hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
  assert hits == [], f"{what}:\n" + "\n".join(hits)


@pytest.mark.parametrize("line,what", [
    ("see SPEC §7 for the recipe", "a specification users do not have"),
    ("reads ../shared/parity", "a path outside the repository"),
    ('"out": "/work/main/bench/results"', "an absolute path of a machine"),
    ("No GPU was available in this session", "the circumstances of the work"),
    ("(the suite before issues 17 and 19 landed)", "the circumstances of the work"),
])
def test_the_patterns_catch_what_they_are_for(line, what):
  assert FORBIDDEN[what].search(line)
  assert not any(p.search("sfd_jax.sweep._SPEC_KEYS; ${TMPDIR:-/tmp}/x; gs://bucket/run")
                 for p in FORBIDDEN.values())


def test_readme_is_a_front_page():
  text = (REPO / "README.md").read_text(encoding="utf-8")
  assert len(text.splitlines()) <= 150
  picture = re.search(r"!\[[^\]]*\]\((docs/img/[^)]+\.png)\)", text)
  assert picture, "the demo's picture"
  png = REPO / picture.group(1)
  assert png.is_file() and png.stat().st_size <= 200 * 1024
  for needle in ("## Status", "ImageNet → latents → SFD-XL on a pod → samples → FID",
                 "huggingface.co/SFD-Project/SFD", "VIRTUAL_imagenet256_labeled.npz",
                 "docs/scale.md", "GPU"):
    assert needle in text, needle
  for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
    if link != "docs/scale.md":        # the TPU planning page of its own change
      assert (REPO / link).exists(), link


def test_method_page_cites_the_paper_and_the_reference_code():
  text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
  assert "arXiv:2512.04926" in text and "Semantics Lead the Way" in text
  assert "github.com/yuemingPAN/SFD" in text
  # every "docs/method.md §N" a file points at exists
  sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\b", text, re.M))
  numbered = set(re.findall(r"^(\d+)\. ", text.split("## 12.", 1)[1].split("## 13.")[0],
                            re.M))
  missing = []
  for path in _files():
    for ref in re.findall(r"method\.md §(\d+(?:\.\d+)?)",
                          path.read_text(encoding="utf-8", errors="replace")):
      major, _, minor = ref.partition(".")
      ok = ref in sections or (major == "12" and minor in numbered) or (
          major == "15" and minor) or (major in sections and not minor)
      if not ok:
        missing.append(f"{path.relative_to(REPO)}: §{ref}")
  assert missing == []
