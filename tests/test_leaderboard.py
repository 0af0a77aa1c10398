"""The leaderboard's verdicts: Student's t on n - 1 degrees of freedom (checked against the published table),
a 95% interval, `*` only where it excludes 0 and survives Holm's correction, no test without spread, and
partial figures never ranked against whole ones."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from charlm.cli import compose
from charlm.compare import load_recipes, plan_entry
from charlm.errors import ConfigError
from charlm.scoring.leaderboard import paired_difference, vs_leader_cell, write_outputs
from charlm.scoring.significance import holm, t_p_value, t_quantile

# Two-sided 95% points of Student's t (the 0.975 quantile), as printed in standard tables (e.g. NIST/SEMATECH
# e-Handbook, table 1.3.6.7.2)
PUBLISHED_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                   10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df,q", sorted(PUBLISHED_T_975.items()))
def test_the_t_quantile_matches_the_published_table(df, q):
    assert t_quantile(df) == pytest.approx(q, abs=5e-4)


def test_t_tails_in_closed_form():
    assert t_p_value(1.0, 1) == pytest.approx(0.5, abs=1e-12)                  # Cauchy: P(|T| > 1) = 1/2
    assert t_p_value(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)  # df 2: 1 - t / sqrt(2 + t^2)
    assert t_p_value(0.0, 7) == pytest.approx(1.0, abs=1e-12)


def test_three_seeds_at_t_2_8_are_not_marked_and_a_tight_difference_is():
    zero = {1: 0.0, 2: 0.0, 3: 0.0}
    # 0.02, 0.03, 0.065: mean 0.038333, sd 0.023629, SE 0.013642, t = 2.81 < 4.303 (df 2): p = 0.107
    loose = paired_difference({1: 0.02, 2: 0.03, 3: 0.065}, zero)
    assert loose["t"] == pytest.approx(2.81, abs=0.005) and loose["p"] == pytest.approx(0.107, abs=0.001)
    assert loose["mark"] is False and loose["agree"] is True and loose["low"] < 0 < loose["high"]
    # 0.035, 0.04, 0.045: mean 0.04, SE 0.005 / sqrt(3) = 0.0028868, t = 13.86: interval 0.0276 to 0.0524
    tight = paired_difference({1: 0.035, 2: 0.04, 3: 0.045}, zero)
    assert tight["mark"] is True and tight["t"] == pytest.approx(13.856, abs=0.001)
    assert (round(tight["low"], 4), round(tight["high"], 4)) == (0.0276, 0.0524)


def test_no_spread_is_no_test_but_the_signs_agree():
    same = paired_difference({1: 1.61, 2: 1.62, 3: 1.59}, {1: 1.60, 2: 1.61, 3: 1.58})  # 0.01 on every seed
    assert same["agree"] is True and same["mark"] is False and same["p"] is None and same["low"] is None
    row = {"sign_agrees": "yes", "vs_leader": same["mean"], "vs_leader_se": same["se"], "vs_leader_low": None,
           "vs_leader_high": None, "vs_leader_mark": ""}
    assert vs_leader_cell(row) == "+0.0100 ± 0 (no spread)"


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 = 1; then max(1, 0.9): never below an earlier one


def write_results(folder, bpc: float, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"best_val_bpc": bpc, "best_step": 1, "steps": 1, **extra}))


def test_a_partial_figure_is_not_ranked_against_whole_ones(tmp_path):
    cfg = compose("compare", ["budget.tokens=1000", "seeds=[1]"])
    write_results(tmp_path / "lstm-1", 1.6, partial=True, scored_chars=5000, total_chars=111539)
    write_results(tmp_path / "gru-1", 1.5)  # no `partial` key: whole
    with pytest.raises(ConfigError, match=r"lstm-1/results.json: a partial figure \(5,000 of 111,539"):
        write_outputs(tmp_path, cfg, ["lstm", "gru"], [1])
    assert not (tmp_path / "leaderboard.md").exists() and not (tmp_path / "leaderboard.csv").exists()
    write_results(tmp_path / "gru-1", 1.5, partial=True, scored_chars=4000, total_chars=111539)
    with pytest.raises(ConfigError, match="partial figures rank only on the same characters"):
        write_outputs(tmp_path, cfg, ["lstm", "gru"], [1])
    write_results(tmp_path / "gru-1", 1.5, partial=True, scored_chars=5000, total_chars=111539)
    write_outputs(tmp_path, cfg, ["lstm", "gru"], [1])
    assert "scored the first 5,000 of 111,539 val characters" in (tmp_path / "leaderboard.md").read_text()


def test_compare_refuses_a_mix_of_partial_and_whole_in_one_line(tmp_path):
    """Finished runs are skipped, so compare goes straight to the leaderboard, and refuses it."""
    models, cfg = ["rnn", "lstm"], compose("compare", ["models=[rnn,lstm]", "budget.tokens=100000", "seeds=[1]"])
    for m in models:
        overrides, _ = plan_entry(cfg, load_recipes("auto"), m, 1)
        (tmp_path / f"{m}-1").mkdir()
        (tmp_path / f"{m}-1" / "compare.json").write_text(json.dumps({"overrides": overrides}))
    write_results(tmp_path / "rnn-1", 2.0, partial=False, scored_chars=111539, total_chars=111539)
    write_results(tmp_path / "lstm-1", 1.9, partial=True, scored_chars=5000, total_chars=111539)
    proc = run_cli("charlm.compare", "models=[rnn,lstm]", "budget.tokens=100000", "seeds=[1]", "context=false",
                   f"hydra.run.dir={tmp_path}", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "partial figure (5,000 of 111,539" in lines[0] and "rnn-1" in lines[0]
    assert not (tmp_path / "leaderboard.md").exists()
