"""`python -m charlm.compare models=[rnn,lstm,gru,transformer] budget.seconds=60`: an honest leaderboard.

Each model trains for the same budget, one after the other in this process (never in parallel: it is a
timing comparison), as a normal charlm.train run (`charlm.train.run`: the builder, no second loop) in
DIR/MODEL-SEED, with its recipe from conf/compare/cpu.yaml or gpu.yaml and then the command line's train
overrides (any key that is not compare's own). DIR (hydra.run.dir, by default
outputs/compare/RECIPES-BUDGET[-HASH]) then holds leaderboard.md/.csv and curves.png. The same command
run again skips the entries that wrote results.json and starts an unfinished one again.

The budget is charlm.train's own (`budget.seconds`, `budget.tokens`, `budget.evals`: charlm.training.budget), passed
through unchanged. Every model runs every seed, so the leaderboard can compare them seed by seed
(charlm.scoring.leaderboard). After each run, the best checkpoint's effective context (charlm.studies.context) goes
into DIR/MODEL-SEED/context.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from charlm import cli
from charlm.atomic import finite, write_json
from charlm.cli import dedupe, override_key
from charlm.config import check_sections
from charlm.errors import ConfigError
from charlm.schemas import BudgetConfig
from charlm.scoring.leaderboard import read_json, write_outputs
from charlm.studies.compare_context import context_report, measure_context
from charlm.studies.compare_dynamic import dynamic_report, dynamic_settings, measure_dynamic, pack_dynamic
from charlm.train import check_config, pick_trainer, run
from charlm.training import rundir
from charlm.training.budget import DEFAULT_EVALS, check_budget, tokens_per_step

KEYS = {"models", "seeds", "recipes", "overrides", "budget", "context", "context_positions", "context_seeds",
        "dynamic", "dynamic_args", "hydra"}  # compare's own


@dataclass
class CompareTop:
    """`python -m charlm.compare`'s own keys (conf/compare.yaml)."""

    models: Optional[List[str]] = None
    seeds: List[int] = field(default_factory=lambda: [1337])
    recipes: str = "auto"
    overrides: List[str] = field(default_factory=list)
    context: bool = True
    context_positions: int = 2000
    context_seeds: int = 1
    dynamic: bool = False                                    # the dynamic-evaluation column (studies.compare_dynamic)
    dynamic_args: List[str] = field(default_factory=list)   # its settings: the command line's dynamic.KEY=VALUE


def pack_args(argv: list[str]) -> list[str]:
    """Compare's own arguments as given; every other key=value goes into `overrides=[...]` (train overrides)."""
    own = [a for a in argv if a.startswith("-") or "=" not in a or override_key(a).split(".")[0] in KEYS]
    train = [a for a in argv if a not in own]
    if train and any(override_key(a) == "overrides" for a in own):
        print("error: give train overrides as key=value arguments or in overrides=[...], not both", file=sys.stderr)
        sys.exit(2)
    quoted = ",".join("'" + a.replace("'", "\\'") + "'" for a in train)
    return dedupe(own) + ([f"overrides=[{quoted}]"] if train else [])


def recipe_path(recipes: str) -> Path:
    """conf/compare/NAME.yaml (auto: gpu with CUDA, else cpu), or a YAML file's path."""
    name = ("gpu" if torch.cuda.is_available() else "cpu") if recipes == "auto" else recipes
    path = Path(cli.CONF_DIR) / "compare" / f"{name}.yaml"
    return path if path.is_file() else Path(name)


def load_recipes(recipes: str) -> dict[str, list[str]]:
    """{model: [train overrides]} ('all': for every model, first)."""
    path = recipe_path(recipes)
    if not path.is_file():
        raise ConfigError(f"recipes={recipes}: no such recipe file (auto, cpu, gpu or a YAML file's path)")
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(o, str) for o in v)
                                             for v in data.values()):
        raise ConfigError(f"recipes={recipes}: each block must be a list of key=value train overrides ({path})")
    return data


def known_models(recipes: dict) -> list[str]:
    """Every conf/model/*.yaml: the recipe file's order first, the others by name."""
    names = sorted(p.stem for p in (Path(cli.CONF_DIR) / "model").glob("*.yaml"))
    return [m for m in recipes if m in names] + [m for m in names if m not in recipes]


def compose_train(overrides: list[str], model: str) -> DictConfig:
    """The train config these overrides compose to (inside the Hydra app, or on its own before it)."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():
            from hydra import compose

            return compose(config_name="train", overrides=overrides)
        return cli.compose("train", overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one line naming the model
        raise ConfigError(f"{model}: {cli._compose_error_line(e)}") from None


def plan_entry(cfg: DictConfig, recipes: dict, model: str, seed: int) -> tuple[list[str], DictConfig]:
    """One run's train overrides (model, recipe, command line, seed, budget) and its checked config."""
    base = pick_trainer(dedupe([f"model={model}", *recipes.get("all", []), *recipes.get(model, []),
                                *OmegaConf.to_container(cfg.overrides, resolve=False), f"seed={seed}"]))
    b = cfg.budget
    size = f"budget.seconds={b.seconds:g}" if b.seconds is not None else f"budget.tokens={b.tokens}"
    overrides = dedupe(base + [size, f"budget.evals={b.evals or DEFAULT_EVALS}"])
    train_cfg = compose_train(overrides, model)
    try:
        check_config(train_cfg)
    except ConfigError as e:
        raise ConfigError(f"{model}: {e}") from None
    return overrides, train_cfg


def selection(cfg: DictConfig) -> tuple[dict, list[str], list[int]]:
    """Compare's own keys checked; the recipes, the models and the seeds they name."""
    check_sections(cfg, {"budget": BudgetConfig}, CompareTop)
    check_budget(cfg, one_kind=True)  # tokens: at least one step, checked per model by train
    if cfg.context_positions < 1:
        raise ConfigError(f"context_positions={cfg.context_positions}: must be >= 1")
    if cfg.context_seeds < 1:
        raise ConfigError(f"context_seeds={cfg.context_seeds}: must be >= 1")
    if cfg.dynamic:
        dynamic_settings(list(cfg.dynamic_args))  # checked before anything trains
    recipes = load_recipes(str(cfg.recipes))
    known = known_models(recipes)
    models, seeds = list(cfg.models or []) or known, list(cfg.seeds)
    if unknown := [m for m in models if m not in known]:
        raise ConfigError(f"models: unknown model {unknown[0]!r} (known: {', '.join(known)})")
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds={seeds}: different whole numbers >= 0")
    if len(set(models)) < len(models):
        raise ConfigError(f"models={models}: each model once")
    return recipes, models, seeds


def check(cfg: DictConfig) -> None:
    """Compare's keys, then every model's composed train config: bad input fails before anything is written."""
    recipes, models, seeds = selection(cfg)
    for m in models:
        plan_entry(cfg, recipes, m, seeds[0])


def default_dir(cfg: DictConfig, argv: list[str]) -> list[str]:
    """Without hydra.run.dir: outputs/compare/RECIPES-BUDGET[-HASH of the overrides], the same for the
    same command, so running it again continues."""
    if rundir.explicit_dir(cfg) is not None:
        return argv
    b = cfg.budget
    tag = f"{recipe_path(str(cfg.recipes)).stem}-" + (f"{b.seconds:g}s" if b.seconds is not None else f"{b.tokens}tok")
    evals = b.evals or DEFAULT_EVALS
    extra = json.dumps([OmegaConf.to_container(cfg.overrides, resolve=False), evals])  # not context: no retraining
    if extra != json.dumps([[], DEFAULT_EVALS]):
        tag += "-" + hashlib.sha1(extra.encode()).hexdigest()[:8]
    return [*argv, f"hydra.run.dir='{Path('outputs') / 'compare' / tag}'"]


class Curve(L.Callback):
    """At each validation, append (step, tokens, wall seconds since training started, val bpc) to
    RUN_DIR/curve.json: the leaderboard's curves and time to the best checkpoint (the seconds are taken
    when validation starts: when those weights were done)."""

    def __init__(self, path: Path):
        self.path, self.points, self.t0 = path, [], time.perf_counter()
        self.t_val = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.t_val = time.perf_counter() - self.t0

    def on_validation_end(self, trainer, pl_module) -> None:
        bpc = trainer.callback_metrics.get("val/bpc")
        if trainer.sanity_checking or trainer.global_rank != 0 or bpc is None:
            return
        dm = trainer.datamodule
        per_step = tokens_per_step(dm.batch_size, dm.block_size, trainer.world_size, trainer.accumulate_grad_batches)
        self.points.append({"step": trainer.global_step, "seconds": round(self.t_val, 3),
                            "tokens": trainer.global_step * per_step,
                            "val_bpc": finite(float(bpc))})
        write_json(self.path, {"points": self.points})


def group_wandb(train_cfg: DictConfig, folder: Path) -> None:
    """With W&B as a logger: the comparison's runs in one group (compare-DIRNAME), each named MODEL-SEED."""
    wandb = (train_cfg.get("logger") or {}).get("wandb")
    if wandb is not None:
        with open_dict(wandb):
            wandb.group, wandb.name = wandb.get("group") or f"compare-{folder.parent.name}", folder.name


def train_entry(cfg: DictConfig, folder: Path, model: str, overrides: list[str], train_cfg: DictConfig) -> bool:
    """Train one (model, seed) in `folder`; a failure is recorded in job.json and the comparison goes on."""
    folder.mkdir(parents=True)
    write_json(folder / "compare.json", {"overrides": overrides})
    (folder / ".hydra").mkdir()
    OmegaConf.save(train_cfg, folder / ".hydra" / "config.yaml")  # as a charlm.train run folder
    group_wandb(train_cfg, folder)
    try:
        with rundir.tee(folder / "train.log"):
            run(train_cfg, folder, model, [Curve(folder / "curve.json")])
        return True
    except Exception as e:  # noqa: BLE001 - one failed model must not end the comparison
        write_json(folder / "job.json", {"status": "failed", "error": cli.error_line(e)})
        print(f"error: {folder.name}: {cli.error_line(e)}", file=sys.stderr)
        if not isinstance(e, cli.user_error_types()):
            traceback.print_exc()
        from charlm.scoring.summary import finish_wandb

        finish_wandb()
        return False


def compare(cfg: DictConfig) -> None:
    """Train every (model, seed) not yet finished in the Hydra run dir, then write the leaderboard."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    recipes, models, seeds = selection(cfg)
    plans = {(m, s): plan_entry(cfg, recipes, m, s) for m in models for s in seeds}
    for (m, s), (overrides, _) in plans.items():
        done = read_json(out / f"{m}-{s}" / "compare.json")
        if (out / f"{m}-{s}" / "results.json").exists() and done != {"overrides": overrides}:
            raise ConfigError(f"{out / f'{m}-{s}'} was trained with other settings (its compare.json); "
                              "pick another hydra.run.dir or delete that folder")
    print(f"charlm.compare: {len(models)} models x {len(seeds)} seeds -> {out}")
    failed = 0
    for (m, s), (overrides, train_cfg) in plans.items():
        folder = out / f"{m}-{s}"
        if (folder / "results.json").exists():
            print(f"charlm.compare: {folder.name}: finished before, skipped")
        else:
            if folder.exists():
                print(f"charlm.compare: {folder.name}: unfinished, starting it again")
                shutil.rmtree(folder)
            print(f"\ncharlm.compare: {folder.name}: {' '.join(overrides)}")
            if not train_entry(cfg, folder, m, overrides, train_cfg):
                failed += 1
                continue
        measured = s in list(seeds)[: int(cfg.context_seeds)]  # the curve costs ~30-90 s a run on a CPU
        if cfg.context and measured and not (folder / "context.json").exists():
            measure_context(folder, train_cfg, int(cfg.context_positions))
        if cfg.dynamic:  # every seed: the gain is paired seed by seed
            measure_dynamic(folder, train_cfg, list(cfg.dynamic_args))
    with open_dict(cfg):
        cfg.recipes = str(recipe_path(str(cfg.recipes)))  # the leaderboard names the recipes actually used
    write_outputs(out, cfg, models, seeds)
    context = context_report(out, models, seeds)
    dynamic = dynamic_report(out, models, seeds) if cfg.dynamic else None
    print("\n" + (out / "leaderboard.md").read_text() + ("\n" + dynamic if dynamic else ""))
    print(f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'curves.png'}"
          + (f", {out / 'context.png'}, {out / 'context.md'}" if context else "")
          + (f", {out / 'dynamic.md'}, {out / 'dynamic.csv'}" if dynamic else ""))
    if failed:
        print(f"error: {failed} of {len(plans)} runs failed (see the leaderboard)", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    cli.hydra_main("compare", compare, argv_hook=lambda argv: pack_args(pack_dynamic(argv)), check=check,
                   plan=default_dir)


if __name__ == "__main__":
    main()
