"""What the project ships to users (README.md, docs/**/*.md, conf/**/*.yaml) speaks of the project, not of how
it was built: no tracker numbers, no work-log words. GPU files may still say a figure is not measured yet."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

WORDS = [r"stop [0-9]", r"issue [0-9]", r"issue's author", r"\bsessions?\b", r"helper's"]
NOT_MEASURED = r"not (yet )?measured"


def shipped() -> list[str]:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "conf").rglob("*.yaml")]
    return sorted(str(f.relative_to(ROOT)) for f in files if f.is_file())


def about_gpu(rel: str) -> bool:
    """conf/compare/gpu.yaml, conf/experiment/*_gpu.yaml and docs about GPUs (gpu in the name)."""
    name = rel.rsplit("/", 1)[-1]
    return (rel == "conf/compare/gpu.yaml" or (rel.startswith("conf/experiment/") and name.endswith("_gpu.yaml"))
            or (rel.startswith("docs/") and "gpu" in name.lower()))


def offending(rel: str, text: str) -> list[str]:
    patterns = WORDS + ([] if about_gpu(rel) else [NOT_MEASURED])
    rx = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    return [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if rx.search(line)]


def test_the_check_catches_each_word_and_spares_gpu_files_only_for_not_measured():
    for line in ["see stop 8", "(Issue 12)", "the issue's author", "one Session", "sessions ran", "the helper's"]:
        assert offending("docs/x.md", line), line
    assert offending("conf/model/lstm.yaml", "# Not yet measured on a CPU")
    assert offending("docs/x.md", "not measured")
    assert not offending("conf/experiment/lstm_gpu.yaml", "# Not yet measured with charlm on a GPU")
    assert not offending("docs/gpu_check.md", "not measured")
    assert offending("conf/experiment/lstm_gpu.yaml", "# no GPU in the session")  # the other words still count
    assert not offending("docs/x.md", "stopped at step 8; issued; possession; helpers")


@pytest.mark.parametrize("rel", shipped())
def test_shipped_text_has_no_build_process_words(rel):
    hits = offending(rel, (ROOT / rel).read_text(encoding="utf-8"))
    assert not hits, "\n".join(hits)


OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/tmp\b")  # folders a user's clone does not have


def test_shipped_files_name_no_folder_outside_the_checkout():
    """README, docs, conf, scripts, the package, CI and the Makefile point only inside the checkout."""
    assert OUTSIDE.search("see ../shared/x.md") and OUTSIDE.search("--config-dir /tmp/sweep")
    assert not OUTSIDE.search("outputs/tmp/x and a.tmp file")
    files = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / ".ci").rglob("*"),
             *(f for d in ("docs", "conf", "scripts", "charlm") for f in (ROOT / d).rglob("*")
               if f.suffix in (".md", ".yaml", ".py", ".sh", ".c"))]
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files if f.is_file()
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
