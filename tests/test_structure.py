"""The structure holds: no import cycles, small modules, every config key typed, models addable from outside."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_cli, run_main
from omegaconf import DictConfig, ListConfig, OmegaConf

from charlm.cli import compose
from charlm.config import check_sections
from charlm.errors import ConfigError
from charlm.schemas import GradflowTop, ReportTop, SampleTop
from charlm.train import check_config

PKG = ROOT / "charlm"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """charlm module -> the charlm modules it imports, anywhere in the file (functions included)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_charlm():
    graph = import_graph()
    assert "charlm.training.build" in graph and "charlm.training.module" in graph["charlm.training.build"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_errors_is_a_leaf():
    assert import_graph()["charlm.errors"] == set()


# The layers, bottom up. A module imports only from its own layer and those below it; a module named
# in no list is core. Leaves import no charlm module but leaves; the entry points are `python -m` commands.
LEAVES = {"charlm.errors", "charlm.atomic", "charlm.rng", "charlm.data.split", "charlm.schemas",
          "charlm.training.schedule", "charlm.yardstick", "charlm.corpora"}
BUILDER = {"charlm.training.build", "charlm.train", "charlm.scoring.results"}
ENTRY = {"charlm.report", "charlm.gradflow", "charlm.compare", "charlm.sweep", "charlm.sample", "charlm.evaluate",
         "charlm.export"}
LAYERS = ["leaves", "models", "core", "builder", "studies", "entry"]


def layer(module: str) -> str:
    if module in LEAVES:
        return "leaves"
    if module == "charlm.models" or module.startswith("charlm.models."):
        return "models"
    if module == "charlm.studies" or module.startswith("charlm.studies."):
        return "studies"
    if module == "charlm.bench" or module.startswith("charlm.bench."):  # the benchmarks: above every layer
        return "entry"
    return "builder" if module in BUILDER else "entry" if module in ENTRY else "core"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in sorted(graph.items()) for d in sorted(deps)
            if rank[layer(d)] > rank[layer(m)]]


def test_layer_checker_finds_an_upward_import():
    assert upward_imports({"charlm.data.datamodule": {"charlm.studies.recall"}, "charlm.studies.recall": set()})
    assert upward_imports({"charlm.models.rnn": {"charlm.training.build"}, "charlm.training.build": set()})
    assert not upward_imports({"charlm.studies.probe": {"charlm.training.build", "charlm.errors"}})


def test_no_import_runs_back_up_a_layer():
    graph = import_graph()
    assert {"charlm.studies.report", "charlm.studies.recall", "charlm.models.layers"} <= set(graph)
    assert set(LEAVES) <= set(graph), set(LEAVES) - set(graph)
    assert not upward_imports(graph), upward_imports(graph)


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 320}
    assert not long, f"modules over ~300 lines: {long}"


def test_no_getattr_on_models_outside_the_contract():
    """Optional model capabilities are read in one place (models/contract.py)."""
    offenders = []
    for p in PKG.rglob("*.py"):
        if p.name == "contract.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args:
                arg = ast.unparse(node.args[0])
                if "model" in arg and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    offenders.append(f"{p.name}: getattr({arg}, {node.args[1].value!r})")
    assert not offenders, offenders


# ---- every key typed --------------------------------------------------------------------------


def wrong_value(value):
    """A value of the wrong type for a key that holds `value`."""
    if value is None:
        return {"a": 1}  # a mapping: wrong for a number, a flag or a string
    if isinstance(value, (bool, int, float)):
        return "abc"
    if isinstance(value, str):
        return [1, 2]  # a list where a string belongs
    if isinstance(value, ListConfig):
        return {"a": 1}
    raise TypeError(value)


def leaves(cfg: DictConfig, prefix: str = ""):
    for key in cfg:
        if str(key).startswith("_") or key == "hydra":
            continue
        node = cfg._get_node(key)
        value = node._value() if not isinstance(node, (DictConfig, ListConfig)) else node
        if isinstance(value, DictConfig):
            yield from leaves(value, f"{prefix}{key}.")
        elif isinstance(value, str) and "${" in value:
            continue  # an interpolation: typed where it points
        else:
            yield f"{prefix}{key}", value


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


TRAIN_VARIANTS = ([[f"model={m}"] for m in options("model")] + [[f"data={d}"] for d in options("data")]
                  + [["logger=csv"], ["callbacks=early_stopping"], ["scheduler=one_cycle"], ["trainer=gpu"]])


def _expect_error(cfg, key: str, value, check) -> None:
    bad = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(bad, key, wrong_value(value), merge=False)
    with pytest.raises(ConfigError) as err:
        check(bad)
    msg = str(err.value)
    assert key in msg and "\n" not in msg, f"{key}: {msg}"


def _changed_sections(cfg: DictConfig, base: DictConfig) -> set[str]:
    """Top-level sections of `cfg` whose (unresolved) content differs from `base`'s."""
    def section(c: DictConfig, k: str):
        return OmegaConf.to_container(OmegaConf.masked_copy(c, [k])) if k in c else None

    return {k for k in cfg if k != "hydra" and section(cfg, k) != section(base, k)}


@pytest.mark.parametrize("variant", TRAIN_VARIANTS, ids=lambda v: v[0])
def test_every_train_key_rejects_a_wrong_type(variant):
    """Every key of every variant: model=lstm (the default composition) checks all of its keys; each other variant
    checks its own group's keys and those of any other section it changes (the rest are the same keys with the
    same values and schemas as in the default, already checked there)."""
    extra = ["data.path=/tmp/x.txt"] if variant in (["data=text"], ["data=enwik8"], ["data=text8"]) else []
    cfg = compose("train", variant + extra)
    all_keys = list(leaves(cfg))
    assert len(all_keys) > 20
    changed = _changed_sections(cfg, compose("train", []))
    full = variant == ["model=lstm"]  # train.yaml's own defaults: every key
    assert not (full and changed), changed
    sections = changed | {variant[0].split("=")[0]}
    keys = all_keys if full else [(k, v) for k, v in all_keys if k.split(".")[0] in sections]
    assert keys, variant
    for key, value in keys:
        _expect_error(cfg, key, value, check_config)


@pytest.mark.parametrize("name,schema", [("sample", SampleTop), ("gradflow", GradflowTop), ("report", ReportTop)])
def test_every_entry_point_key_rejects_a_wrong_type(name, schema):
    cfg = compose(name, ["ckpt_path=x"] if name == "sample" else [])
    for key, value in leaves(cfg):
        if key.startswith("presets."):  # the report's presets are checked when a preset is used
            continue
        _expect_error(cfg, key, value, lambda c: check_sections(c, {}, schema))


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=-1", "optim.lr=-1"), ("clip.value=-0.5", "clip.value=-0.5"),
    ("scheduler.warmup_steps=-3", "scheduler.warmup_steps=-3"), ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("model.dropout=1.5", "model.dropout=1.5"), ("trainer.precision=bf17", "trainer.precision=bf17"),
    ("model.cell=lsmt", "model.cell=lsmt"), ("eval.streams=0", "eval.streams=0"),
])
def test_impossible_values_are_refused(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        check_config(compose("train", [override]))


# One CLI run per entry point by default; the in-process test above checks every key's type (slow: the rest)
@pytest.mark.parametrize("module,args,key", [
    ("charlm.train", ["optim.lr=abc"], "optim.lr"),
    pytest.param("charlm.train", ["seed=abc"], "seed", marks=pytest.mark.slow),
    pytest.param("charlm.train", ["model.dropout=abc"], "model.dropout", marks=pytest.mark.slow),
    pytest.param("charlm.train", ["trainer.precision=bf17"], "precision", marks=pytest.mark.slow),
    ("charlm.sample", ["ckpt_path=x", "temperature=abc"], "temperature"),
    pytest.param("charlm.sample", ["ckpt_path=x", "top_k=abc"], "top_k", marks=pytest.mark.slow),
])
def test_cli_wrong_type_is_one_line_exit_2(module, args, key, tmp_path):
    proc = run_cli(module, *args, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


# ---- a model from outside the package -----------------------------------------------------------


def test_model_from_outside_the_package(tmp_path, monkeypatch):
    """One .py file on PYTHONPATH and one YAML on hydra.searchpath: trains (a fresh `python -m charlm.train` with
    PYTHONPATH), then samples, evaluates and gradflows through the CLIs' main() here, the folder importable (the
    config folder named again: a checkpoint's config builds only classes charlm registers or the command names)."""
    ext = ROOT / "tests" / "external"
    env = {"PYTHONPATH": str(ext)}
    search = f"hydra.searchpath=[file://{ext / 'conf'}]"
    run_dir = tmp_path / "run"
    run_cli("charlm.train", search, "model=bag_of_chars", *[a for a in TINY if "model." not in a],
            f"hydra.run.dir={run_dir}", env=env)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == "bag_of_chars" and results["best_val_loss"] is not None
    monkeypatch.syspath_prepend(str(ext))
    out = run_main("charlm.sample", search, f"ckpt_path={run_dir}/checkpoints/best.ckpt", "n_chars=25", "seed=0")
    assert len(out.stdout.rstrip("\n")) >= 25
    ev = run_main("charlm.evaluate", search, f"ckpt_path={run_dir}/checkpoints/best.ckpt")
    assert "bits/char" in ev.stdout
    run_main("charlm.gradflow", search, f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"out_dir={tmp_path / 'gf'}",
             "seq_len=12", "n_rows=2")
    curves = json.loads((tmp_path / "gf" / "gradient_flow.json").read_text())
    assert len(curves["bag_of_chars"]["trained"]) == 12


def test_no_code_edits_the_import_path():
    """The package, its scripts and its tests import charlm as installed: none of them edits `sys`'s path
    (an import path that depends on a file's place breaks once the file moves)."""

    def edits(tree: ast.AST) -> list[int]:
        return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys"]

    assert edits(ast.parse("import sys\nsys." + "path.append('scripts')")) == [2]  # split: a grep finds no such line
    found = {str(p.relative_to(ROOT)): lines for d in ("charlm", "scripts", "tests") for p in (ROOT / d).rglob("*.py")
             if (lines := edits(ast.parse(p.read_text())))}
    assert not found, found
