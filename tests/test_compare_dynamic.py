"""charlm.compare's dynamic-evaluation column (charlm.studies.compare_dynamic): the paired gain on hand-made
results, a real tiny comparison with dynamic=true, and bad settings refused before anything trains."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml
from conftest import ROOT, run_main, tiny_model_overrides

from charlm.cli import compose
from charlm.compare import pack_args, selection
from charlm.errors import ConfigError
from charlm.scoring.significance import t_quantile
from charlm.studies.compare_dynamic import dynamic_report, pack_dynamic

SHAKESPEARE_HEAD = 20_000  # characters of the corpus the real comparison trains on (val: the last 2,000)


def write_runs(out, runs: dict[str, dict[int, tuple[float, float]]]) -> None:
    """DIR/MODEL-SEED/dynamic.json with (static bpc, dynamic bpc) per seed."""
    for m, seeds in runs.items():
        for s, (static, dynamic) in seeds.items():
            (out / f"{m}-{s}").mkdir(parents=True)
            (out / f"{m}-{s}" / "dynamic.json").write_text(json.dumps(
                {"static_bpc": static, "dynamic_bpc": dynamic, "settings": {"method": "rms", "segment": 50,
                                                                             "lr": 3e-4, "decay": 0.01},
                 "protocol": {"text": "one stream, state carried, segments of 50 chars"}}))


def test_the_gain_is_paired_seed_by_seed_with_its_t_interval(tmp_path):
    out = tmp_path / "cmp"
    runs = {"lstm": {1: (2.00, 1.80), 2: (2.10, 1.92), 3: (2.05, 1.84)},        # gains -0.20, -0.18, -0.21
            "transformer": {1: (2.00, 2.01), 2: (2.10, 2.08), 3: (2.05, 2.05)},  # gains +0.01, -0.02, 0
            "gru": {1: (2.3, 2.2)}}                                               # one seed: no interval
    write_runs(out, runs)
    md = dynamic_report(out, ["lstm", "transformer", "gru", "rnn"], [1, 2, 3])   # rnn has no run: left out
    with (out / "dynamic.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["lstm", "transformer", "gru"]
    gains = [-0.20, -0.18, -0.21]
    mean, se = statistics.fmean(gains), statistics.stdev(gains) / math.sqrt(3)
    assert float(rows["lstm"]["gain"]) == pytest.approx(mean) and float(rows["lstm"]["gain_se"]) == pytest.approx(se)
    assert float(rows["lstm"]["gain_high"]) == pytest.approx(mean + t_quantile(2) * se)
    assert rows["lstm"]["gain_mark"] == "*" and rows["transformer"]["gain_mark"] == ""
    assert float(rows["gru"]["gain"]) == pytest.approx(-0.1) and rows["gru"]["gain_low"] == ""
    assert "| lstm | 2.0500 | 1.8533 | -0.1967 ± 0.0088 * |" in md and "n/a (1 seed)" in md
    assert dynamic_report(tmp_path / "none", ["lstm"], [1]) is None


@pytest.mark.parametrize("args, fragment", [
    (["dynamic=true", "dynamic_args=[lr]"], "dynamic_args: 'lr': each must be dynamic.KEY=VALUE"),
    (["dynamic=true", "dynamic.lr=-1"], "dynamic.lr=-1"),
    (["dynamic=true", "dynamic.sgement=5"], "dynamic.sgement"),
])
def test_bad_dynamic_settings_are_refused_before_anything_trains(args, fragment):
    cfg = compose("compare", pack_args(pack_dynamic(["budget.tokens=1000", "models=[rnn]", *args])))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        selection(cfg)


def test_a_tiny_comparison_gets_its_dynamic_column(tmp_path):
    corpus = tmp_path / "head.txt"
    corpus.write_text((ROOT / "charlm" / "corpora" / "tinyshakespeare.txt").read_text()[:SHAKESPEARE_HEAD])
    recipes = tmp_path / "tiny.yaml"
    recipes.write_text(yaml.safe_dump({"all": ["++trainer.limit_val_batches=2"], "rnn": tiny_model_overrides("rnn")}))
    out = tmp_path / "cmp"
    ran = run_main("charlm.compare", "models=[rnn]", "seeds=[1,2]", "budget.tokens=1024", "budget.evals=1",
                   "context=false", "dynamic=true", "dynamic.segment=20", "dynamic.rms_batches=2",
                   f"recipes={recipes}", "data=text", f"data.path={corpus}", "logger=none", "data.batch_size=8",
                   "data.block_size=16", "eval.window_batches=1", "sample.n_chars=20", "callbacks.progress_bar=null",
                   "++trainer.enable_progress_bar=false", f"hydra.run.dir={out}")
    for s in (1, 2):
        d = json.loads((out / f"rnn-{s}" / "dynamic.json").read_text())
        assert d["chars_scored"] == SHAKESPEARE_HEAD // 10 - 1 and d["settings"]["segment"] == 20
        assert d["settings"]["seed"] == s and d["args"] == ["dynamic.segment=20", "dynamic.rms_batches=2"]
    with (out / "dynamic.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["model"] == "rnn" and row["paired_seeds"] == "2"
    assert "# Dynamic evaluation" in ran.stdout and "dynamic.md" in ran.stdout
