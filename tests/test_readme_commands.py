"""Every command in a code block of README.md and docs/*.md that runs `python -m charlm.X` or a `make`
target that runs one, put through what its entry point does before it runs anything: the argument hook,
Hydra's composition and the config check (`charlm.cli.checked_config`), in this process, nothing trained
or written. Placeholders are filled (checkpoints, folders, numbers); a multirun is split into its jobs as
Hydra's basic sweeper splits it; a command shown with its `error:` line must fail with that line. So a
documented command cannot break unnoticed."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

from charlm import cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CKPT_KEYS = {"ckpt_path": "a.ckpt", "against": "b.ckpt"}                  # every documented one is a placeholder
FILLED = {"N": "100", "...": "To be, or not to be"}                        # whole-value placeholders
DIR_KEYS = ("out", "out_dir", "sweep_dir", "hydra.run.dir")                # folders: a fresh one under tmp


@dataclass
class Documented:
    """One command as a document shows it."""

    where: str                    # FILE:LINE
    words: list[str]              # the shell's words, comments dropped
    error: str | None             # the `error:` line shown under it, when it shows one


def _code_lines(path: Path):
    """(line number, logical line, the next physical line) of every fenced code block, continuations joined."""
    inside, held, first, lines = False, "", None, path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            inside, held, first = not inside, "", None
            continue
        if not inside:
            continue
        first = i + 1 if first is None else first
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
            continue
        yield first, held + line, lines[i + 1] if i + 1 < len(lines) else ""
        held, first = "", None


def documented() -> list[Documented]:
    found = []
    for path in DOCS:
        for line, text, after in _code_lines(path):
            text = re.sub(r"^\s*\$ ", "", text)                              # a shell prompt
            if not re.search(r"python -m charlm\.|^\s*make \w", text.split("#")[0]):
                continue                                                    # output, YAML, Python, prose
            words = shlex.split(text, comments=True)                        # a broken quote fails collection
            runs = any(w == "-m" and n.startswith("charlm.") for w, n in zip(words, words[1:]))
            if runs or (words[:1] == ["make"] and len(words) > 1):
                error = after.strip() if after.strip().startswith("error:") else None
                found.append(Documented(f"{path.relative_to(ROOT)}:{line}", words, error))
    return found


DOCUMENTED = documented()


def make_targets() -> dict[str, tuple[str, str]]:
    """{target: (module, its recipe's words after `-m module`)} for the Makefile's targets that run charlm.X,
    and the Makefile's `VAR ?= default`s under the key ''."""
    text = (ROOT / "Makefile").read_text()
    targets = {m[1]: (m[2], m[3]) for m in re.finditer(r"^([\w-]+):[^\n]*\n\t[^\n]*-m (charlm\.\w+) ?([^\n]*)$",
                                                        text, re.M)}
    defaults = dict(re.findall(r"^(\w+) \?= ?(.*)$", text, re.M))
    return {**targets, "": ("", defaults)}


def invocation(doc: Documented, tmp: dict, monkeypatch) -> tuple[str, list[str]] | None:
    """(module, argv) as the shell and make would start it, placeholders filled; None for a make target that
    runs no charlm module (test, lint, bench, record)."""
    segments = [[]]
    for w in doc.words:
        if w == "&&":
            segments.append([])
        else:
            segments[-1].append(w)
    extra = []
    for seg in segments[:-1]:                                               # cp SWEEP_DIR/best.yaml conf/...
        assert seg[0] == "cp" and seg[1].startswith("SWEEP_DIR/") and seg[2].startswith("conf/"), doc.where
        (tmp["user_conf"] / Path(seg[2]).relative_to("conf")).write_text((tmp["sweep_dir"] / seg[1][10:]).read_text())
        extra = [f"hydra.searchpath=[file://{tmp['user_conf']}]"]          # the copy, where Hydra finds it
    words = segments[-1]
    if words[0] == "make":
        targets = make_targets()
        if words[1] not in targets:
            return None
        module, recipe = targets[words[1]]
        values = {**targets[""][1], "ARGS": "", **dict(w.split("=", 1) for w in words[2:])}
        argv = shlex.split(re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], ""), recipe))
    else:
        at = words.index("-m")
        for env in words[: at - 1]:                                         # PYTHONPATH=my_models
            name, _, value = env.partition("=")
            assert (name, value) == ("PYTHONPATH", "my_models"), f"{doc.where}: fill {env} in this test"
            monkeypatch.syspath_prepend(str(ROOT / "tests" / "external"))
        module, argv = words[at + 1], words[at + 2:]
    return module, fill(argv, tmp) + extra


def fill(argv: list[str], tmp: dict) -> list[str]:
    """Placeholders as a user fills them; `[key=a|b]` (optional) as its first choice, `[... ...]` dropped."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a.startswith("[") and a.endswith("]") and "=" in a:
            key, _, choices = a[1:-1].partition("=")
            a = f"{key}={choices.split('|')[0]}"
        elif a.startswith("["):
            while not argv[i - 1].endswith("]"):                            # [overrides ...]
                i += 1
            continue
        if a == "--config-dir":                                             # Hydra's flag, as an override
            assert argv[i] == "SWEEP_DIR", argv
            a, i = f"hydra.searchpath=[file://{tmp['sweep_dir']}]", i + 1
        key, eq, value = a.partition("=")
        value = value.replace("[file://my_conf]", f"[file://{ROOT / 'tests' / 'external' / 'conf'}]")
        if key in CKPT_KEYS:
            value = str(tmp[CKPT_KEYS[key]])
        elif key in DIR_KEYS:
            value = str(tmp["root"] / value.replace("/", "_"))
        value = FILLED.get(value, value)
        out.append(key + eq + value.replace("$HOME", str(Path.home())) if eq else a)
    return out


def entry_point(module: str, monkeypatch) -> dict:
    """What `module.main()` hands to charlm.cli.hydra_main: the config name, the argument hook, the check."""
    import importlib

    seen = {}

    def record(config_name, fn, argv_hook=None, check=None, plan=None):
        seen.update(config_name=config_name, argv_hook=argv_hook, check=check)

    mod = importlib.import_module(module)
    with monkeypatch.context() as m:
        m.setattr(cli, "hydra_main", record)
        m.setattr(sys.modules[mod.main.__module__], "hydra_main", record, raising=False)
        m.setattr(sys, "argv", [module])
        mod.main()
    return seen


def jobs(argv: list[str]) -> list[list[str]]:
    """A single run's arguments, or each job of a multirun (`-m`) as Hydra's basic sweeper splits it."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return [argv]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([a for a in argv if a not in ("-m", "--multirun")])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


class Stop(Exception):
    """charlm.sweep's search reached: everything before it (both compositions) passed."""


def check_command(module: str, argv: list[str], monkeypatch) -> None:
    """What the entry point does with `argv` before it runs anything (SystemExit(2) on a user mistake)."""
    if module == "charlm.sweep":                                            # composes both configs itself
        import charlm.sweep

        monkeypatch.setattr(charlm.sweep, "search", lambda *a: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            charlm.sweep.main(argv)
        return
    entry = entry_point(module, monkeypatch)
    argv = entry["argv_hook"](argv) if entry["argv_hook"] else argv
    cli.check_launcher(argv)
    for job in jobs(argv):
        cli.checked_config(entry["config_name"], job, entry["check"])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> dict:
    """Files the placeholders stand for: two tiny checkpoints, a sweep folder with its best.yaml, a config
    folder for a copied experiment."""
    import torch
    from omegaconf import OmegaConf

    from charlm.checkpoint import save_model
    from charlm.data.vocab import CharVocab
    from charlm.models.contract import build_model
    from charlm.sweep import experiment_yaml

    root = tmp_path_factory.mktemp("documented")
    vocab = CharVocab.from_text("To be, or not to be\n")
    model_cfg = OmegaConf.to_container(cli.compose("train", ["model.hidden_dim=8", "model.embed_dim=4"]).model)
    torch.manual_seed(0)
    files = {"root": root, "sweep_dir": root / "sweep", "user_conf": root / "user_conf"}
    for name in CKPT_KEYS.values():
        files[name] = save_model(root / name, build_model(model_cfg, len(vocab)), model_cfg, vocab, "lstm")
    best = experiment_yaml(["model=lstm", "trainer=cpu", "logger=none", "optim.lr=0.02", "model.hidden_dim=128"],
                           "the best trial")
    for path in (files["sweep_dir"] / "best.yaml", files["sweep_dir"] / "experiment" / "best.yaml"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(best)
    (files["user_conf"] / "experiment").mkdir(parents=True)
    return files


def test_the_documents_show_commands():
    where = {d.where.split(":")[0] for d in DOCUMENTED}
    assert len(DOCUMENTED) >= 50 and {"README.md", "docs/datasets.md", "docs/sweeps.md"} <= where


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[d.where for d in DOCUMENTED])
def test_documented_command_composes(doc, tmp, monkeypatch, capsys):
    assert not any(re.search(r"=~", w) for w in doc.words), f"{doc.where}: a shell leaves ~ after = as it is; " \
                                                             "write $HOME"
    monkeypatch.chdir(tmp["root"])                                          # relative paths land in tmp
    called = invocation(doc, tmp, monkeypatch)
    if called is None:
        return                                                              # make test, lint, bench, record
    module, argv = called
    if cli.missing_launcher(argv):                                          # the rest still composes
        assert "pip install -e '.[slurm]'" in (ROOT / doc.where.split(":")[0]).read_text(), doc.where
        argv = [a for a in argv if not a.startswith(("hydra/launcher=", "hydra.launcher."))]
    if doc.error is None:
        check_command(module, argv, monkeypatch)                            # SystemExit here fails the test
        return
    with pytest.raises(SystemExit) as stop:
        check_command(module, argv, monkeypatch)
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == doc.error, doc.where


def test_make_targets_in_the_documents_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for doc in DOCUMENTED:
        if doc.words[0] == "make":
            assert doc.words[1] in targets, f"{doc.where}: no make target {doc.words[1]}"


def test_slurm_launcher_without_its_extra_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        cli.check_launcher(["-m", "hydra/launcher=slurm", "model=lstm,gru"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: hydra/launcher=slurm needs the slurm extra: pip install -e '.[slurm]' "
                                       "(hydra-submitit-launcher)\n")
