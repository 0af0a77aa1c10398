"""`python -m charlm.explain ckpt_path=A [against=B] [text=... | data.path=FILE | split=val] [start=N]
[n_chars=2000] [out=DIR]`: what a model does on a text, character by character, as one HTML page.

Writes DIR/explain.html (self-contained: inline CSS and a small inline script, no network) and
DIR/explain.png, and prints each model's bits per character on the text. The per-character losses
come from the yardstick's own pass (`charlm.yardstick`, one stream with the state carried, or the
sliding window of a windowed model), so they sum to what `charlm.evaluate eval.streams=1` reports
on the same text. Needs torch and the model, not Lightning. The page is drawn by `charlm.scoring.explain_page`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from charlm.atomic import write_json
from charlm.checkpoint import load_model
from charlm.cli import hydra_main, quote_free_text
from charlm.config import check_keys, check_sections
from charlm.data.corpus import encode_corpus
from charlm.data.split import split_slice
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError, CorpusError, UnknownCharError
from charlm.models.contract import capabilities
from charlm.scoring import units as unit_study
from charlm.yardstick import IGNORE, eval_dataset, protocol

MAX_CHARS = 20_000  # a page a browser loads and draws in about 4 s (docs/explain.md: 50,000 took 7-8 s)
TOP_K = 5


@dataclass
class ExplainEval:
    """The yardstick's settings for the pass (always one stream: every character in order)."""

    chunk: int = 256
    stride: Optional[int] = None
    batch_size: int = 64


@dataclass
class ExplainTop:
    ckpt_path: str = "???"
    against: Optional[str] = None
    text: Optional[str] = None
    split: str = "val"
    start: int = 0
    n_chars: int = 2000
    out: str = "explain"
    unknown: str = "error"
    device: str = "auto"
    data: Any = None
    eval: ExplainEval = field(default_factory=ExplainEval)


@dataclass
class Trace:
    """What one model did on a text of n characters: character t+1's loss and the top-k of the
    distribution that predicted it, for t in 0..n-2, and memory-gate openings at each character."""

    name: str
    vocab: CharVocab
    losses: np.ndarray                  # (n-1,) nats, float64
    top_ids: np.ndarray                 # (n-1, k) ids into vocab, most likely first
    top_p: np.ndarray                   # (n-1, k) probabilities
    gates: dict[str, np.ndarray]        # layer -> (n,) mean opening while reading each character
    protocol: dict
    units: Any = None                   # what units.* found (model A): charlm.scoring.units.UnitsFound

    @property
    def bpc(self) -> float:
        return float(self.losses.sum() / len(self.losses) / math.log(2))


@dataclass
class CorpusKeys:
    """The keys of a `data` node explain reads to find the text; the data module's other keys (batch and
    block sizes, sampling) do not apply here. Checked without importing the data module (and Lightning)."""

    path: Optional[str] = None
    name: str = "text"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    errors: str = "strict"
    unit: str = "char"


def check(cfg: DictConfig) -> None:
    """Types and ranges of every key (charlm.config), before anything is read or written."""
    if str(cfg.data.get("_target_", "")).startswith("charlm.data.hf."):  # reading such a corpus brings Lightning anyway
        check_sections(cfg, {"eval": ExplainEval, "units": unit_study.UnitsKeys}, ExplainTop, targets=("data",))
    else:
        check_keys(cfg.data, CorpusKeys, "data.", allow_extra=True)  # data.errors, data.unit: charlm.schemas.RULES
        check_sections(cfg, {"eval": ExplainEval, "units": unit_study.UnitsKeys}, ExplainTop)  # data: checked above
    unit_study.check_units(cfg.units)
    if cfg.split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split={cfg.split}: must be one of train, val, test, all")
    if cfg.start < 0:
        raise ConfigError(f"start={cfg.start}: must be >= 0")
    if not 2 <= cfg.n_chars <= MAX_CHARS:
        raise ConfigError(f"n_chars={cfg.n_chars}: must be in 2..{MAX_CHARS:,} (a page a browser renders in "
                          "a few seconds)")
    if not str(cfg.out).strip():
        raise ConfigError("out: an empty folder name")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out={cfg.out}: exists and is not a folder")


def source_text(cfg: DictConfig, unit: str = "char") -> tuple[str, str]:
    """(the stretch of text to explain, where it came from), in the models' symbols: `text=` is read as
    charlm.sample reads a prompt, characters or (unit byte) its UTF-8 bytes, one chr(b) each."""
    if cfg.text is not None:
        text, where = str(cfg.text).replace("\\n", "\n"), "text"
        if unit == "byte":
            text = text.encode("utf-8").decode("latin-1")  # start, n_chars and the page count bytes
        if len(text) > MAX_CHARS:
            raise ConfigError(f"text: {len(text):,} {'bytes' if unit == 'byte' else 'characters'}; a page holds "
                              f"at most {MAX_CHARS:,}")
        text = text[cfg.start : cfg.start + cfg.n_chars]
    else:
        path, own_splits = cfg.data.get("path"), None
        if str(cfg.data.get("_target_", "")).startswith("charlm.data.hf."):  # a Hugging Face dataset's joined text
            from charlm.data.hf import (
                corpus_source,  # brings Lightning (charlm.data.datamodule): only for such a corpus
            )

            path, own_splits = corpus_source(cfg.data)
        corpus_vocab, ids = encode_corpus(path, cfg.data.get("errors", "strict"), cfg.data.get("unit", "char"))
        ids = ids[own_splits[cfg.split] if own_splits and cfg.split in own_splits else
                  split_slice(len(ids), cfg.split, cfg.data.val_fraction, cfg.data.get("test_fraction", 0.0))]
        where = f"{cfg.data.path or cfg.data.get('name', 'corpus')} ({cfg.split})"
        text = corpus_vocab.decode(ids[cfg.start : cfg.start + cfg.n_chars].tolist())
    if len(text) < 2:
        raise CorpusError(f"{where}: {len(text)} characters from start={cfg.start}, nothing to score")
    return text, where


def known_text(text: str, where: str, vocabs: dict[str, CharVocab], unknown: str) -> str:
    """The text, checked against every model's vocabulary (unknown=skip drops what any model lacks)."""
    missing = {name: "".join(sorted({c for c in text if c not in v.stoi})) for name, v in vocabs.items()}
    missing = {name: m for name, m in missing.items() if m}
    if not missing:
        return text
    if unknown == "error":
        said = "; ".join(f"{m[:40]!r} not in {name}'s vocabulary" for name, m in missing.items())
        raise UnknownCharError(f"{where}: characters outside a model's vocabulary: {said} (unknown=skip drops them)")
    drop = set("".join(missing.values()))
    kept = "".join(c for c in text if c not in drop)
    if len(kept) < 2:
        raise CorpusError(f"{where}: {len(kept)} characters left once unknown ones are dropped, nothing to score")
    return kept


@torch.no_grad()
def trace(model: torch.nn.Module, vocab: CharVocab, text: str, name: str, chunk: int = 256,
          stride: int | None = None, batch_size: int = 64, device: str = "cpu", gates: bool = True) -> Trace:
    """The yardstick's pass with one stream (or its sliding window), keeping every scored position
    (and the gate openings of a recurrent model, unless gates=False)."""
    ids = torch.as_tensor(vocab.encode_array(text).astype(np.int64))
    caps = capabilities(model)
    k = min(TOP_K, len(vocab))
    losses, top_ids, top_p, state = [], [], [], None
    for x, y, reset in eval_dataset(ids, caps.context_size, 1, chunk, stride, batch_size):
        logits, state = model(x.to(device), None if reset else state)           # (B, T, V)
        y = y.to(device)
        keep = y != IGNORE                                                       # (B, T), row-major = text order
        scored = logits.float()[keep]                                            # (N, V)
        losses.append(F.cross_entropy(scored, y[keep], reduction="none").double().cpu())
        p, i = scored.softmax(-1).topk(k, -1)                                    # (N, k) each, sorted
        top_p.append(p.cpu())
        top_ids.append(i.cpu())
    losses = torch.cat(losses).numpy()
    if len(losses) != len(ids) - 1:
        raise RuntimeError(f"the pass scored {len(losses)} characters of {len(ids) - 1}")
    chars = len(losses)
    return Trace(name, vocab, losses, torch.cat(top_ids).numpy(), torch.cat(top_p).double().numpy(),
                 gate_trace(model, ids, chunk, device) if gates and caps.context_size is None else {},
                 protocol(caps.context_size, 1, chunk, stride, chars))


@torch.no_grad()
def gate_trace(model: torch.nn.Module, ids: torch.Tensor, chunk: int, device: str) -> dict[str, np.ndarray]:
    """Mean memory-gate opening per layer at each character, read chunk by chunk with the state carried."""
    hook = capabilities(model).gate_trace
    parts: dict[str, list[torch.Tensor]] = {}
    state = None
    for a in range(0, len(ids), chunk):
        gates, state = hook(ids[None, a : a + chunk].to(device), state)         # {layer: (1, t)}
        for key, g in gates.items():
            parts.setdefault(key, []).append(g[0].float().cpu())
    return {key: torch.cat(p).numpy() for key, p in parts.items()}


def pick_device(device: str) -> str:
    return device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def _label(hp: dict, path) -> str:
    return f"{hp.get('model_name') or 'model'} ({path})"


def explain(cfg: DictConfig) -> list[Trace]:
    """Read, check, run both passes, then write the page and the PNG (nothing is written on bad input)."""
    from charlm.scoring.explain_page import write_page

    device = pick_device(cfg.device)
    models = {"A": load_model(cfg.ckpt_path)}
    if cfg.against:
        models["B"] = load_model(cfg.against)
    units = {key: m[1].unit for key, m in models.items()}
    if len(set(units.values())) > 1:
        raise ConfigError(f"against={cfg.against}: reads {units['B']}s, ckpt_path={cfg.ckpt_path} reads "
                          f"{units['A']}s; explain compares models of one unit")
    text, where = source_text(cfg, units["A"])
    text = known_text(text, where, {k: m[1] for k, m in models.items()}, cfg.unknown)
    if cfg.units.find is not None:
        unit_study.target(str(cfg.units.find), text)  # a pattern the stretch never matches: said before any pass
    e = cfg.eval
    traces = []
    for key, (model, vocab, hp) in models.items():
        label = f"{key}: {_label(hp, cfg.ckpt_path if key == 'A' else cfg.against)}"
        traces.append(trace(model.to(device), vocab, text, label, e.chunk, e.stride, e.batch_size, device))
    extra = []
    if cfg.units.find is not None or cfg.units.ablate is not None:  # model A's units (charlm.scoring.units)
        from charlm.scoring.units_page import sections

        a, (model, vocab, _) = traces[0], models["A"]
        ids = torch.as_tensor(vocab.encode_array(text).astype(np.int64))
        a.units = unit_study.inspect_units(model, text, ids, cfg.units, e.chunk, device, a.losses, lambda: trace(
            model, vocab, text, a.name, e.chunk, e.stride, e.batch_size, device, gates=False).losses)
        extra = sections(text, a.units, a.name)
    write_page(Path(cfg.out), text, traces, where, extra)
    if traces[0].units is not None:
        write_json(Path(cfg.out) / "units.json", unit_study.summary(traces[0].units))
    return traces


def quote_args(argv: list[str]) -> list[str]:
    """Let `text=To be, or not` pass through Hydra's override grammar verbatim, and a regex `units.find=...`
    always (a pattern may start with a quote)."""
    return quote_free_text(argv, ("text",), verbatim=("units.find",))


def _job(cfg: DictConfig) -> None:
    for t in explain(cfg):
        print(f"{t.name}: {t.bpc:.4f} {t.vocab.unit_label} on {len(t.losses):,} {t.vocab.unit}s "
              f"({t.protocol['text']})")
        if t.units is not None:
            print("\n".join(unit_study.lines(t.units, len(t.losses) + 1)))
    print(f"wrote {Path(cfg.out) / 'explain.html'} and {Path(cfg.out) / 'explain.png'}")


def explain_run(cfg: DictConfig, built, results: dict, run_dir: Path) -> None:
    """charlm.train's hook: with `explain.n_chars=N`, the page for the first N val characters under the
    best checkpoint, written into the run folder (and logged to W&B when it is a logger)."""
    n = int((cfg.get("explain") or {}).get("n_chars") or 0)
    if not n or not results:
        return
    from charlm.scoring.explain_page import write_page

    device = pick_device("auto")
    model, vocab, hp = load_model(results["best_ckpt"])
    text = built.dm.vocab.decode(built.dm.splits["val"][: min(n, MAX_CHARS)].tolist())
    t = trace(model.to(device), vocab, text, f"A: {_label(hp, results['best_ckpt'])}", cfg.eval.chunk,
              cfg.eval.stride, cfg.eval.batch_size, device)
    html, png = write_page(run_dir, text, [t], "val")
    print(f"explain:    {html} ({t.bpc:.4f} {vocab.unit_label} on {len(t.losses):,} val {vocab.unit}s)")
    for lg in built.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.experiment.log({"explain/page": wandb.Html(html.read_text(encoding="utf-8")),
                               "explain/grid": wandb.Image(str(png))})


def main() -> None:
    hydra_main("explain", _job, argv_hook=quote_args, check=check)


if __name__ == "__main__":
    main()
