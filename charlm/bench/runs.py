"""The parent's side of scripts/bench.py's measuring children (charlm.bench.child): each one a fresh
process started with its spec, a failure reported with the end of its log; charlm and the bare loop
started as a pair that takes turns on the machine through two named pipes, and the ratio read off
their paired slices.

On a CPU the charlm side is forked from a fork server that imported charlm's training stack once
(torch, Lightning, Hydra: ~5 s a process, 44 times a bench); the bare side is started afresh (it
imports torch alone, ~2 s, while the charlm side builds), so neither side carries the other's modules.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from charlm.bench import ROOT, child
from charlm.bench.window import CUDA

QUIET_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
FORKED = ("charlm",)  # the kinds forked from the fork server (CPU only: a CUDA process must not be forked)
PRELOAD = ["charlm.bench.child", "charlm.cli", "charlm.train"]  # what the fork server imports once


def child_env(env: dict | None = None) -> dict:
    return {**os.environ, **QUIET_ENV, **(env or {})}


class Forked:
    """A child forked from the fork server, answering as subprocess.Popen does (poll, wait, kill)."""

    def __init__(self, proc: multiprocessing.Process):
        self.proc = proc

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()


def fork_server():
    """The multiprocessing fork server, started on first use with PRELOAD imported and the children's
    environment (modules read some of it when imported)."""
    os.environ.update(QUIET_ENV)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_child(kind: str, spec: dict, work: Path, env: dict | None = None) -> tuple[subprocess.Popen | Forked, Path,
                                                                                       str]:
    """A measuring child for `spec`: forked (a FORKED kind on a CPU, no `env` of its own) or started afresh."""
    tag = f"{kind}-{spec['name']}-{spec.get('mode', '')}"
    spec_path, log = work / f"{tag}.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    if kind in FORKED and not env and not CUDA and "forkserver" in multiprocessing.get_all_start_methods():
        proc = fork_server().Process(target=child.forked, args=(kind, str(spec_path), str(log)))
        proc.start()
        return Forked(proc), spec_path, tag
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "charlm.bench.child", kind, str(spec_path)], cwd=ROOT,
                                env=child_env(env), stdout=fh, stderr=subprocess.STDOUT)
    return proc, spec_path, tag


def finish_child(proc: subprocess.Popen, spec_path: Path, tag: str, others=()) -> dict:
    rc = proc.wait()
    if rc != 0:
        for other in others:  # a partner waiting for its turn would wait forever
            other.kill()
        log = spec_path.with_suffix(".log")
        sys.exit(f"bench: {tag} failed ({rc}):\n" + (log.read_text()[-3000:] if log.exists() else "(no log)"))
    return json.loads(spec_path.with_suffix(".out").read_text())


def run_child(kind: str, spec: dict, work: Path, env: dict | None = None) -> dict:
    return finish_child(*start_child(kind, spec, work, env))


def run_pair(charlm_spec: dict, bare_spec: dict, work: Path, charlm_first: bool) -> tuple[dict, dict]:
    """charlm and the bare loop at once, taking turns slice by slice (charlm.bench.window.Turns) through two
    named pipes; `charlm_first` says which side starts."""
    pipes = [work / "to-charlm", work / "to-bare"]
    for pipe in pipes:
        pipe.unlink(missing_ok=True)
        os.mkfifo(pipe)
    turns = [{"my_pipe": str(pipes[0]), "their_pipe": str(pipes[1]), "first": charlm_first},
             {"my_pipe": str(pipes[1]), "their_pipe": str(pipes[0]), "first": not charlm_first}]
    c = start_child("charlm", charlm_spec | {"turns": turns[0]}, work)
    b = start_child("bare", bare_spec | {"turns": turns[1]}, work)
    while c[0].poll() is None and b[0].poll() is None:
        time.sleep(0.2)
    done, rest = (c, b) if c[0].poll() is not None else (b, c)  # the one that ended first: a failure stops the other
    first, second = finish_child(*done, others=[rest[0]]), finish_child(*rest, others=[done[0]])
    return (first, second) if done is c else (second, first)


def paired_ratio(charlm: dict, bare: dict) -> float:
    """charlm's rate over the bare loop's, read off the slices of a pair that took turns.

    The slices of both sides are put on one time line (their `spans`); each slice between two of the
    other side's is compared with the geometric mean of those two, which cancels a machine that speeds
    up or slows down steadily (a slice compared with only its successor or predecessor would carry
    the drift between them). Of these log ratios, the middle 60% are averaged (`trimmed_mean`): a slice
    that met a burst on one side alone is dropped as the median would, and the rest count fully.
    Without spans (older results), the slices are paired in order; without slices, the whole windows.
    """
    c_rates, b_rates = charlm.get("slices", []), bare.get("slices", [])
    if not c_rates or not b_rates:
        return charlm["tokens_per_s"] / bare["tokens_per_s"]
    logs = []
    if "spans" in charlm and "spans" in bare:
        line = sorted([(s[0], 1, r) for s, r in zip(charlm["spans"], c_rates)]
                      + [(s[0], -1, r) for s, r in zip(bare["spans"], b_rates)])      # (start, side, rate)
        logs = [side * (math.log(rate) - (math.log(before[2]) + math.log(after[2])) / 2)
                for before, (_, side, rate), after in zip(line, line[1:], line[2:])
                if before[1] == after[1] == -side]                                     # log(charlm / bare)
    if not logs:  # no spans, or fewer than three slices in turns: the slices in order
        logs = [math.log(c / b) for c, b in zip(c_rates, b_rates)]
    return math.exp(trimmed_mean(logs))


def trimmed_mean(values: list[float], cut: float = 0.2) -> float:
    """The mean of `values` without the lowest and highest `cut` of them (at least one each side once
    there are five or more); the median's robustness to a few wild values, with less of its noise."""
    values = sorted(values)
    k = max(1, int(len(values) * cut)) if len(values) >= 5 else 0
    kept = values[k : len(values) - k]
    return sum(kept) / len(kept)
