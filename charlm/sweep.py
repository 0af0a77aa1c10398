"""`python -m charlm.sweep hparams_search=lstm_lr n_trials=20 [train overrides ...]`: an Optuna search.

TPE proposes each trial; every validation reports val/loss to the trial, and the pruner stops
trials that trail the median. Each trial is a normal charlm.train run in SWEEP_DIR/trial_NNN (its
config composed with Hydra's compose API from conf/train.yaml + the search's fixed overrides + the
command line's + the trial's sampled values). The study lives in SWEEP_DIR/study.db (SQLite):
rerunning the same command with `sweep_dir=SWEEP_DIR` resumes it, running only the missing trials
(a trial cut off by an interruption is run again with the same values). At the end SWEEP_DIR holds
summary.md / summary.csv (as a multirun's) and best.yaml, the best trial as an experiment config:

    python -m charlm.train --config-dir SWEEP_DIR experiment=best     # SWEEP_DIR/experiment/best.yaml

Why not Hydra's optuna sweeper: hydra-optuna-sweeper 1.3.0 pins optuna<3 (and Hydra's sweepers
have no hook to report intermediate values, so no pruning). This drives current Optuna directly
through its ask/tell interface and keeps the same search-space syntax (`choice`, `interval`, `tag(log, ...)`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import traceback
from datetime import datetime
from pathlib import Path

import lightning as L
import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from charlm.atomic import write_atomic, write_json
from charlm.cli import CONF_DIR, compose_or_exit, dedupe, error_line, override_key, report_user_errors, user_error_types
from charlm.errors import ConfigError
from charlm.scoring.summary import finish_wandb, markdown, write_summary
from charlm.train import pick_trainer, run

SWEEP_KEYS = set(OmegaConf.load(Path(CONF_DIR) / "sweep.yaml")) - {"defaults"} | {"hparams_search"}
GROUPS = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}  # config groups: `model=gru`, not a value


class PruneOnVal(L.Callback):
    """Reports `monitor` to the Optuna trial after each validation; raises TrialPruned when the pruner says stop."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val/loss"):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step}: {self.monitor}={float(value):.4f}")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own arguments (keys of conf/sweep.yaml), and the train overrides (everything else)."""
    own = [a for a in argv if override_key(a).split(".")[0] in SWEEP_KEYS]
    return own, [a for a in argv if a not in own]


def distribution(key: str, expr: str) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from Hydra sweep syntax: choice(a, b), range(1, 9, 2), interval(0, 1),
    tag(log, interval(1e-4, 1e-2)), tag(int, interval(1, 8))."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    try:
        o = OverridesParser.create().parse_overrides([f"{key}={expr}"])[0]
        v = o.value()
    except Exception as e:  # noqa: BLE001 - Hydra's parse errors: one line is enough
        raise ConfigError(f"{key}={expr}: {str(e).splitlines()[-2 if len(str(e).splitlines()) > 1 else 0]}") from None
    if isinstance(v, ChoiceSweep):
        return CategoricalDistribution(v.list)
    if isinstance(v, RangeSweep):
        values = list(o.sweep_iterator())
        kind = IntDistribution if all(isinstance(x, int) for x in values) else FloatDistribution
        return kind(min(values), max(values), step=abs(v.step))
    if isinstance(v, IntervalSweep):
        if "int" in v.tags:
            return IntDistribution(int(v.start), int(v.end), log="log" in v.tags)
        return FloatDistribution(v.start, v.end, log="log" in v.tags)
    raise ConfigError(f"params.{key}={expr}: not a search expression (choice, range, interval, tag(log, interval))")


def as_override(key: str, value) -> str:
    """`key=value` as Hydra parses it back to the same value."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = str(value) if re.fullmatch(r"[\w./-]+", str(value)) else json.dumps(str(value))
    return f"{key}={text}"


def experiment_yaml(overrides: list[str], comment: str) -> str:
    """An experiment config (`# @package _global_`) that applies `overrides`: groups in its defaults list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    defaults, values = [], OmegaConf.create()
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if o.is_delete() or key.startswith("hydra"):
            continue
        if key in GROUPS:
            defaults.append({f"override /{key}": o.value()})
        else:
            OmegaConf.update(values, key, o.value(), force_add=True)
    comment = "".join(f"# {line}\n" for line in comment.splitlines())
    head = OmegaConf.to_yaml({"defaults": defaults}) if defaults else ""
    return "# @package _global_\n" + comment + head + (OmegaConf.to_yaml(values) if len(values) else "")


def compose_trial(overrides: list[str], run_dir: Path) -> DictConfig:
    """The train config for `overrides`, with Hydra's runtime pointing at `run_dir` (as a multirun job's)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir.resolve())
    HydraConfig.instance().set_config(cfg)  # charlm.train.run reads its run dir and model name from here
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return task


def run_trial(study: optuna.Study, trial: optuna.Trial, fixed: list[str], cfg: DictConfig, sweep_dir: Path) -> None:
    """Train one trial, tell the study how it went, record it for the summary."""
    trial_dir = sweep_dir / f"trial_{trial.number:03d}"
    overrides = dedupe(fixed + [as_override(k, v) for k, v in trial.params.items()])
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("interrupted", True)  # until it ends: a killed search leaves it so, and reruns it
    info = {"num": trial.number, "overrides": overrides, "status": "failed"}
    try:
        task = compose_trial(pick_trainer(overrides), trial_dir)
        results = run(task, extra_callbacks=[PruneOnVal(trial, cfg.metric)])
        value = results.get(cfg.metric.replace("/", "_"), math.nan)
        trial.set_user_attr("interrupted", False)
        if math.isfinite(value):
            study.tell(trial, value)
            info["status"] = "ok"
        else:
            info["error"] = f"{cfg.metric} is {value}"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except optuna.TrialPruned as e:
        info |= {"status": "pruned", "error": str(e)}
        trial.set_user_attr("interrupted", False)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit
        info |= {"status": "interrupted", "error": "run again with the same sweep_dir to resume"}
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)  # a resumed search runs these values first
        raise
    except Exception as e:  # noqa: BLE001 - one bad trial must not end the search
        info["error"] = error_line(e)
        trial.set_user_attr("interrupted", False)
        print(f"error: trial {trial.number}: {info['error']}", file=sys.stderr)
        if not isinstance(e, user_error_types()):
            traceback.print_exc()
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        finish_wandb()
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_json(trial_dir / "job.json", info)
        write_summary(sweep_dir)
        sampled = " ".join(as_override(k, v) for k, v in trial.params.items())
        print(f"\ncharlm.sweep: trial {trial.number} {info['status']}: {sampled} {info.get('error', '')}".rstrip())


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that count towards n_trials: finished, and not cut off by an interruption."""
    return trial.state.is_finished() and not trial.user_attrs.get("interrupted")


def search(cfg: DictConfig, name: str, train_args: list[str], sweep_dir: Path) -> optuna.Study:
    """Create or resume the study in `sweep_dir` and run it up to cfg.n_trials trials."""
    from hydra.utils import instantiate

    sweep_dir.mkdir(parents=True, exist_ok=True)
    exprs, pinned = dict(cfg.params), {override_key(o): o for o in cfg.overrides}
    for arg in train_args:  # a later argument for the same key wins: a value pins it, an expression searches it
        if _is_search(arg):
            exprs[override_key(arg)] = arg.split("=", 1)[1]
            pinned.pop(override_key(arg), None)
        else:
            pinned[override_key(arg)] = arg
            exprs.pop(override_key(arg), None)
    fixed = list(pinned.values())
    space = {k: distribution(k, str(v)) for k, v in exprs.items()}
    if not space:
        raise ConfigError("empty search space: give params in the hparams_search config (or key=choice(...))")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=cfg.study_name or name, storage=storage, load_if_exists=True, direction=cfg.direction,
        sampler=instantiate(cfg.sampler), pruner=instantiate(cfg.pruner),
    )
    if study.trials and cfg.sampler.get("seed") is not None:  # a resumed search must not replay the first draws
        study.sampler = instantiate(cfg.sampler, seed=int(cfg.sampler.seed) + len(study.trials))
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # a search killed mid-trial (one process per study)
        study.enqueue_trial(t.params)
        if (sweep_dir / f"trial_{t.number:03d}").is_dir():
            write_json(sweep_dir / f"trial_{t.number:03d}" / "job.json", {
                "num": t.number, "overrides": t.user_attrs.get("overrides", []), "status": "interrupted",
                "error": "killed: its values run again as a new trial"})
    done = sum(counted(t) for t in study.trials)
    todo = max(0, cfg.n_trials - done)
    print(f"charlm.sweep: {name}: {done} trials done, {todo} to run -> {sweep_dir}  (space: {', '.join(space)})")
    for _ in range(todo):
        run_trial(study, study.ask(space), fixed, cfg, sweep_dir)
        write_best(study, sweep_dir, name)
    return study


def _is_search(arg: str) -> bool:
    return any(f"{fn}(" in arg.split("=", 1)[-1] for fn in ("choice", "range", "interval"))


def write_best(study: optuna.Study, sweep_dir: Path, name: str) -> Path | None:
    """SWEEP_DIR/best.yaml (and experiment/best.yaml for `--config-dir SWEEP_DIR experiment=best`)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = study.best_trial
    comment = (f"Best of {len(done)} finished trials of hparams_search={name} ({sweep_dir / 'study.db'}):\n"
               f"trial {best.number}, objective {best.value:.4f}; searched: "
               + " ".join(as_override(k, v) for k, v in best.params.items()) + "\n"
               f"reuse: python -m charlm.train --config-dir {sweep_dir} experiment=best [overrides ...]")
    text = experiment_yaml(best.user_attrs["overrides"], comment)
    for path in (sweep_dir / "best.yaml", sweep_dir / "experiment" / "best.yaml"):
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, text)
    return sweep_dir / "best.yaml"


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    own, train_args = split_args(sys.argv[1:] if argv is None else argv)
    compose_or_exit("sweep", own)  # a misspelt key or unknown search name: one line, not a traceback
    compose_or_exit("train", pick_trainer([a for a in train_args if not _is_search(a)]))
    with report_user_errors(), initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="sweep", overrides=own, return_hydra_config=True)
        if not isinstance(cfg.n_trials, int) or cfg.n_trials < 0:
            raise ConfigError(f"n_trials={cfg.n_trials}: must be a whole number")
        name = cfg.hydra.runtime.choices["hparams_search"]
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        sweep_dir = Path(cfg.sweep_dir or Path("sweeps") / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        study = search(cfg, name, train_args, sweep_dir)
        print(f"\n{markdown(write_summary(sweep_dir))}\nsummary: {sweep_dir / 'summary.md'}")
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            print("error: no trial finished (see the summary)", file=sys.stderr)
            sys.exit(1)
        best = study.best_trial
        print(f"best:    trial {best.number}, {cfg.metric} {best.value:.4f} -> {sweep_dir / 'best.yaml'}")


if __name__ == "__main__":
    main()
