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


# A figure of four or more significant digits; dates (2026-12-04) and years (Beck et al. 2024) are not figures.
TOKEN = re.compile(r"(?<![\w.,-])-?\d[\d,.]*(?<=\d)(?![\w-])")   # digits with their sign, commas and point
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")   # not a version (2.13.0) or a list (1,2)
YEAR = re.compile(r"(19|20)\d\d")


def significant(figure: str) -> int:
    """Significant digits as written: leading zeros never count, an integer's trailing zeros do not either."""
    digits = figure.replace(",", "")
    if "." not in digits:
        return len(digits.strip("0"))
    return len(digits.replace(".", "").lstrip("0"))


def figures(text: str) -> list[str]:
    """The figures of four or more significant digits in `text`, as written (commas kept)."""
    return [m[0] for m in TOKEN.finditer(text)
            if NUMBER.fullmatch(m[0].lstrip("-")) and significant(m[0].lstrip("-")) >= 4 and not YEAR.fullmatch(m[0])]


def recorded(texts: list[str]) -> set[str]:
    """Every number in `texts`, as written without commas and rounded to 0-4 decimals: what a figure may quote."""
    found = set()
    for text in texts:
        for m in re.finditer(r"\d[\d,]*(?:\.\d+)?", text):
            plain = m[0].replace(",", "")
            if not re.fullmatch(r"\d+(?:\.\d+)?", plain):
                continue
            found.add(plain)
            found.update(f"{float(plain):.{d}f}" for d in range(5))
    return found


def test_the_figure_check_counts_significant_digits_and_accepts_rounding():
    assert figures("calibration 23,237 tokens/s; 2.1492 bpc; 0.0190 sd; 2,900 steps; 1024 chars") == \
        ["23,237", "2.1492", "1024"]
    assert figures("Beck et al. 2024, on 2026-12-04, 3e-4, 1x384, torch 2.13.0, 111,539.") == ["111,539"]
    assert figures("1.4897 / 2.1492, 1.5263; 266 s; (-0.0372 to -0.2204)") == ["1.4897", "2.1492", "1.5263", "-0.2204"]
    known = recorded(['{"calibration_tokens_per_s": 24485.96171, "best_val_bpc": 2.14917948}'])
    assert "24486" in known and "2.1492" in known and "2.1493" not in known and "24487" not in known


def test_readme_quickstart_names_make_test_early():
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40]
    assert any("make test" in line for line in head), "README.md: `make test` is not in the first 40 lines"


def test_every_readme_figure_comes_from_a_record():
    """A README figure of four or more significant digits is in a committed file under results/."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True)
    files = ([ROOT / f for f in listed.stdout.split()] if listed.returncode == 0 and listed.stdout
             else sorted((ROOT / "results").rglob("*")))                # not a git checkout: every file there
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files
             if f.is_file() and f.suffix in (".md", ".json", ".csv")]
    known = recorded(texts)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f for f in figures(readme) if f.lstrip("-").replace(",", "") not in known]
    assert not missing, f"README.md quotes figures no file under results/ holds: {missing}"
