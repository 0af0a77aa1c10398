"""scripts/record.py (`make record`, charlm.bench.record): the tiny preset writes every part's files, machine.json
and record.md into results/MACHINE/DATE (slow); a part already there is skipped, FORCE runs it again; the
machine's slug; a budget recipe's row lands in the attempts table of docs/cpu_record.md; bad PARTS is one line,
exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from charlm.bench import record
from charlm.bench.record_summary import append_cpu_record, machine_slug, mixed_calibrations

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
MACHINE_KEYS = {"machine", "cpu_model", "cpu_count", "cores_usable", "torch_threads", "torch", "python", "platform",
                "date", "calibration_tokens_per_s"}
FILES = ["machine.json", "record.md", "calibration/calibration.json", "train/results.json", "budgets/cpu_2min.json",
         "budgets/cpu_5min.json", "compare/leaderboard.md", "compare/leaderboard.csv", "compare/curves.png",
         "report/REPORT.md", "report/gradient_flow.png", "report/gradient_flow.json", "report/clipping.png",
         "report/memory_span.png", "report/memory_span.json", *(f"{p}/part.json" for p in record.PARTS)]


def record_dir(root) -> "os.PathLike":
    [machine] = root.iterdir()
    [day] = machine.iterdir()
    return day


def test_machine_slug_drops_trademarks_clock_and_names_the_cores():
    assert machine_slug("AMD EPYC 9B14", 2) == "amd-epyc-9b14-2c"
    assert machine_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 4) == "intel-xeon-platinum-8481c-4c"
    assert machine_slug("AMD Ryzen 9 5950X 16-Core Processor", 32) == "amd-ryzen-9-5950x-32c"
    assert machine_slug("", 1) == "cpu-1c"


def test_a_part_is_written_once_then_skipped(tmp_path, monkeypatch, capsys):
    """The orchestration alone: calibration's command replaced by one that writes a known figure."""
    fake = {"tokens_per_s": 1234.4, "cell": "lstm", "layers": 1, "hidden": 384, "batch": 32, "seq": 64}

    def commands(part, rec, tiny):
        out = rec / "calibration" / "calibration.json"
        return [("calibration", [sys.executable, "-c", f"open({str(out)!r}, 'w').write({json.dumps(fake)!r})"])]

    monkeypatch.setattr(record, "commands", commands)
    args = ["--parts", "calibration", "--root", str(tmp_path), "--date", "2026-01-02"]
    assert record.main(args) == 0
    rec = tmp_path / machine_slug() / "2026-01-02"
    machine = json.loads((rec / "machine.json").read_text())
    assert MACHINE_KEYS <= set(machine) and machine["calibration_tokens_per_s"] == 1234.4
    assert "| calibration | " in (rec / "record.md").read_text()
    assert "1,234 tokens/s (bare LSTM 1x384, batch 32 x 64)" in (rec / "record.md").read_text()
    assert machine["cpu_count"] == os.cpu_count() and machine["date"] == "2026-01-02"
    assert "| calibration |" in (rec / "record.md").read_text() and "| train |" not in (rec / "record.md").read_text()
    assert (rec / "runs" / ".gitignore").read_text() == "*\n"
    mtime = (rec / "calibration" / "calibration.json").stat().st_mtime_ns
    capsys.readouterr()
    assert record.main(args) == 0
    assert "calibration: already in" in capsys.readouterr().out
    assert (rec / "calibration" / "calibration.json").stat().st_mtime_ns == mtime


def test_budget_rows_append_to_the_attempts_table(tmp_path):
    rec = tmp_path / "amd-epyc-9b14-2c" / "2026-03-04"
    (rec / "budgets").mkdir(parents=True)
    (rec / "calibration").mkdir()
    (rec / "machine.json").write_text(json.dumps({"machine": "amd-epyc-9b14-2c", "date": "2026-03-04"}))
    (rec / "calibration" / "calibration.json").write_text(json.dumps({"tokens_per_s": 123456.7}))
    (rec / "budgets" / "a.json").write_text(json.dumps(
        {"best_val_loss": 1.5, "best_val_bpc": 2.1640425613334453, "window_val_loss": 1.61, "steps": 10}))
    (rec / "budgets" / "part.json").write_text(json.dumps({"steps": [{"label": "a", "seconds": 130.6}]}))
    doc = tmp_path / "cpu_record.md"
    doc.write_text("# log\n\n| recipe | budget | x |\n|---|---|---|\n| old | 120 s | 1 |\n\nAfter the table.\n")
    append_cpu_record(doc, rec, ("a", "missing"), tmp_path)  # no conf/experiment/a.yaml here: budget '-'
    assert doc.read_text() == ("# log\n\n| recipe | budget | x |\n|---|---|---|\n| old | 120 s | 1 |\n"
                               "| `experiment=a` (wall 131 s) | - | 1.5000 / 2.1640 | 1.6100 | 123,457 | "
                               "amd-epyc-9b14-2c | 2026-03-04 |\n"
                               "\nAfter the table.\n")


def test_parts_measured_at_different_calibrations_are_flagged(tmp_path):
    """A part rerun on a machine 1.5x slower than the rest: record.md says so, naming both speeds."""
    for part, tps in (("train", 36000.0), ("budgets", 24000.0), ("compare", 37000.0)):
        (tmp_path / part).mkdir()
        (tmp_path / part / "part.json").write_text(json.dumps({"seconds": 1, "calibration_tokens_per_s": tps}))
    said = mixed_calibrations(tmp_path, record.PARTS)
    assert "train 36,000" in said and "budgets 24,000" in said and "compare 37,000" in said
    (tmp_path / "budgets" / "part.json").write_text(json.dumps({"seconds": 1, "calibration_tokens_per_s": 34000.0}))
    assert mixed_calibrations(tmp_path, record.PARTS) is None  # 37,000 / 34,000 is within 10%
    (tmp_path / "budgets" / "part.json").write_text(json.dumps({"seconds": 1}))  # a record made before the key
    assert mixed_calibrations(tmp_path, record.PARTS) is None


def test_bad_parts_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "record.py"), "--root", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env={**ENV, "PARTS": "train,bogus"}, timeout=60)
    assert proc.returncode == 2 and "bogus" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_tiny_record_writes_every_file(tmp_path):
    doc = tmp_path / "cpu_record.md"
    doc.write_text((ROOT / "docs" / "cpu_record.md").read_text())
    before = doc.read_text().count("\n| `experiment=cpu_")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "record.py"), "--root", str(tmp_path / "results"),
                           "--cpu-record", str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**ENV, "RECORD_PRESET": "tiny"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = record_dir(tmp_path / "results")
    missing = [f for f in FILES if not (rec / f).is_file()]
    assert not missing, missing
    assert list((rec / "bench").glob("results-*.json")) and list((rec / "bench").glob("results-*.md"))
    assert (rec / "compare" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    machine = json.loads((rec / "machine.json").read_text())
    assert MACHINE_KEYS <= set(machine) and machine["calibration_tokens_per_s"] > 0
    assert machine["machine"] == rec.parent.name and re.fullmatch(r"\d{4}-\d\d-\d\d", rec.name)
    md = (rec / "record.md").read_text()
    for part in record.PARTS:
        assert re.search(rf"^\| {part} \| [\d.]+ (s|min) \| ", md, flags=re.M), part
    assert "Total: " in md and "| rnn |" in md  # the leaderboard is in it
    assert re.search(r"record: calibration \d+ s, train \d+ s, .* bench \d+ s; total \d+ s", proc.stdout)
    assert doc.read_text().count("\n| `experiment=cpu_") == before + 2  # a row per budget recipe
    for name in ("cpu_2min", "cpu_5min"):
        results = json.loads((rec / "budgets" / f"{name}.json").read_text())
        assert results["steps"] == 6 and results["best_val_bpc"] > 0

    mtime = (rec / "calibration" / "calibration.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "record.py"), "--root", str(tmp_path / "results"),
                            "--date", rec.name], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**ENV, "RECORD_PRESET": "tiny", "PARTS": "calibration,train", "FORCE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert (rec / "calibration" / "calibration.json").stat().st_mtime_ns != mtime
    assert "skipped" not in again.stdout and "record: calibration " in again.stdout
