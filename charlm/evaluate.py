"""`python -m charlm.evaluate ckpt_path=PATH [data=text data.path=FILE] [split=val|test|all]`: score any
checkpoint on any corpus with the yardstick (`charlm.yardstick`), and the nanoGPT-style window figure.

Prints nats, bits per character, perplexity and the characters scored, and the cold-start loss
(`charlm.scoring.cold_start`: the first 32 characters from an empty state at 64 seeded offsets);
`json=FILE` also writes them.
Characters outside the model's vocabulary are an error naming them, or with `unknown=skip` are
dropped and counted. Needs torch and the model, not Lightning.

`context=true` also measures the context the model uses (`charlm.studies.context`): the loss at
`context_positions` seeded positions when the model reads only the last k characters, against the
full-context loss there, and the effective context (the smallest k within 1% of it).

`dynamic=true` also runs dynamic evaluation (`charlm.scoring.dynamic`, docs/dynamic.md): the split read as one
stream, each segment scored and then used for one gradient step, beside the static figure on the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from charlm.atomic import write_json
from charlm.checkpoint import load_model
from charlm.cli import hydra_main
from charlm.config import check_sections, check_target_group
from charlm.data.datamodule import encode_corpus, relabel, size_note, unit_mismatch
from charlm.data.hf import corpus_source
from charlm.data.split import split_slice
from charlm.data.vocab import CharVocab, unit_label
from charlm.errors import ConfigError, CorpusError
from charlm.models.contract import capabilities
from charlm.schemas import EvalConfig
from charlm.scoring.cold_start import cold_start_line, cold_start_loss
from charlm.scoring.dynamic import DynamicConfig, check_dynamic, evaluate_dynamic
from charlm.studies.context import context_use, summary
from charlm.yardstick import eval_dataset, latch_warning, protocol, score_rows, stream_means, window_loss


@dataclass
class EvaluateTop:
    ckpt_path: str = "???"
    split: str = "val"
    unknown: str = "error"
    json: Optional[str] = None
    device: str = "auto"
    seed: int = 1337
    context: bool = False
    context_positions: int = 2000
    data: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)


def check(cfg: DictConfig) -> None:
    """Types and ranges of every key (charlm.config)."""
    check_target_group(cfg.data, "data.")
    check_sections(cfg, {"eval": EvalConfig, "dynamic": DynamicConfig}, EvaluateTop, targets=("data",))
    check_dynamic(cfg.dynamic)
    if cfg.dynamic.enabled and cfg.dynamic.tune and cfg.split == "all":
        raise ConfigError("dynamic.tune=true with split=all: the tuning text (the start of val) would be scored "
                          "too; use split=val (tunes on its start, scores the rest) or split=test")
    if cfg.split not in ("val", "test", "all"):
        raise ConfigError(f"split={cfg.split}: must be one of val, test, all")
    if cfg.context_positions < 1:
        raise ConfigError(f"context_positions={cfg.context_positions}: must be at least 1")


def corpus_ids(cfg: DictConfig, vocab: CharVocab) -> tuple[torch.Tensor, int]:
    """The corpus in the model's ids, and how many characters were skipped (unknown=skip)."""
    path, own_splits = corpus_source(cfg.data)  # data.path, or a Hugging Face dataset's joined text (charlm.data.hf)
    unit = cfg.data.get("unit", "char")
    where = cfg.data.get("path") or cfg.data.get("name") or cfg.data.get("dataset") or "corpus"
    corpus_vocab, ids = encode_corpus(path, cfg.data.get("errors", "strict"), unit)
    if corpus_vocab.unit != vocab.unit:
        raise unit_mismatch(where, vocab, unit)
    if note := size_note(cfg.data.get("name", "corpus"), len(ids), unit, cfg.data.get("published_size")):
        print(note)
    if own_splits:  # the dataset's own split, cut before unknown characters are dropped
        ids = ids[own_splits[cfg.split]]
    if corpus_vocab == vocab:  # the model's own corpus: its ids are the model's, nothing to map or copy
        return ids, 0
    table = np.array([vocab.stoi.get(c, -1) for c in corpus_vocab.chars])  # corpus id -> model id (-1: unknown)
    missing = [c for c in corpus_vocab.chars if c not in vocab.stoi]  # known from the vocabularies, no pass over ids
    if missing and cfg.unknown == "error":
        raise CorpusError(f"{where}: characters not in the model's vocabulary: {''.join(missing)[:40]!r} "
                          "(unknown=skip drops and counts them)")
    return relabel(ids, table, vocab.id_dtype)  # one pass over the ids, into a memory-mapped file


def split_of(ids: torch.Tensor, split: str, val_fraction: float, test_fraction: float) -> torch.Tensor:
    """The split as training cut it (`charlm.data.split`: train first, then val, then test, contiguous)."""
    return ids[split_slice(len(ids), split, val_fraction, test_fraction)]


def evaluate(cfg: DictConfig) -> dict:
    model, vocab, hp = load_model(cfg.ckpt_path)
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    ids, skipped = corpus_ids(cfg, vocab)
    if not cfg.data.get("hf_splits"):  # else corpus_ids took the dataset's own split
        ids = split_of(ids, cfg.split, cfg.data.val_fraction, cfg.data.get("test_fraction", 0.0))
    total_chars = max(len(ids) - 1, 0)  # what the whole split scores: every character but the first
    bounds = [n for n in (cfg.eval.max_chars and cfg.eval.max_chars - 1, cfg.eval.get("final_max_chars")) if n]
    if bounds and min(bounds) < total_chars:  # score only the first N characters: a partial figure, said so
        ids = ids[: min(bounds) + 1]
    if len(ids) < 2:
        raise CorpusError(f"split={cfg.split}: {len(ids)} characters, nothing to score")
    dynamic = dynamic_inputs(cfg, vocab, ids) if cfg.dynamic.enabled else None  # checked before any scoring
    e = cfg.eval
    context = capabilities(model).context_size
    batches = eval_dataset(ids, context, e.streams, e.chunk, e.stride, e.batch_size)
    rows, counts = score_rows(model, batches, device, progress=f"evaluate {cfg.split}")
    total, chars = float(rows.sum()), int(counts.sum())
    loss = total / chars
    out = {"checkpoint": str(cfg.ckpt_path), "model": hp.get("model_name"), "split": cfg.split, "unit": vocab.unit,
           "loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0)), "chars_scored": chars,
           "skipped_chars": skipped, "protocol": protocol(context, e.streams, e.chunk, e.stride, chars),
           "stream_losses": stream_means(batches, rows, counts),
           "partial": chars < total_chars, "scored_chars": chars, "total_chars": total_chars}
    if e.window_batches:
        w = window_loss(model, ids, min(e.window, context or e.window), e.window_batches, seed=cfg.seed,
                        device=device)
        out["window_loss"], out["window_bpc"], out["window"] = w["loss"], w["bpc"], w["window"]
    cold = cold_start_loss(model, ids, device=device)  # the first 32 chars from an empty state, 64 seeded offsets
    out.update(cold_start_loss=cold["loss"], cold_start_se=cold["se"], cold_start_protocol=cold["protocol"],
               cold_start_losses=cold["losses"])  # per offset: two checkpoints' differences pair up
    if cfg.context:
        c = context_use(model, ids, n_positions=cfg.context_positions, device=device)
        out.update(context_use=c.pop("context_use"), full_context_loss=c.pop("full_context_loss"),
                   effective_context=c.pop("effective_context"), context=c)
    if dynamic is not None:
        d = evaluate_dynamic(model, dynamic["ids"], cfg.dynamic, dynamic["train"], dynamic["tune"], cfg.seed, device)
        out.update(dynamic_loss=d.pop("dynamic_loss"), dynamic_bpc=d.pop("dynamic_bpc"), dynamic=d)
    return out


# ---- dynamic evaluation (charlm.scoring.dynamic) ------------------------------------------------


def _named_split(cfg: DictConfig, vocab: CharVocab, name: str) -> torch.Tensor:
    """Another split of the same corpus (train for the RMS statistics, val for tuning), cut as training cut it."""
    c = cfg.copy()
    with open_dict(c):
        c.split = name
    ids, _ = corpus_ids(c, vocab)
    return ids if cfg.data.get("hf_splits") else split_of(ids, name, cfg.data.val_fraction,
                                                          cfg.data.get("test_fraction", 0.0))


def dynamic_inputs(cfg: DictConfig, vocab: CharVocab, ids: torch.Tensor) -> dict:
    """The text dynamic evaluation scores, its training text (method rms) and its tuning text (dynamic.tune):
    with split=val, tuning takes the first tune_chars characters and the rest is scored; with split=test, the
    first tune_chars of val. Bad sizes fail here, before anything is scored."""
    d = cfg.dynamic
    train = _named_split(cfg, vocab, "train") if d.method == "rms" else None
    tune = None
    if d.tune:
        source = ids if cfg.split == "val" else _named_split(cfg, vocab, "val")
        tune = source[: d.tune_chars + 1]
        if cfg.split == "val":
            ids = ids[d.tune_chars :]  # its first character is the tuning text's last: context, not scored again
            if len(ids) - 1 < d.segment:
                raise ConfigError(f"dynamic.tune_chars={d.tune_chars}: leaves {max(len(ids) - 1, 0):,} of the "
                                  f"val split's characters to score, fewer than dynamic.segment={d.segment}")
        if len(tune) - 1 < d.segment:
            raise ConfigError(f"dynamic.segment={d.segment}: longer than the tuning text ({len(tune) - 1:,} chars)")
    if d.segment > len(ids) - 1:
        raise ConfigError(f"dynamic.segment={d.segment}: longer than split={cfg.split} "
                          f"({len(ids) - 1:,} characters to score)")
    return {"ids": ids, "train": train, "tune": tune}


def dynamic_lines(out: dict, unit: str) -> list[str]:
    """What evaluate prints for dynamic evaluation: the static and dynamic figures on the same stream, the
    settings, and the tuned values."""
    d, s, label = out["dynamic"], out["dynamic"]["settings"], unit_label(unit)
    lines = [f"dynamic evaluation: {d['static_loss']:.4f} nats, {d['static_bpc']:.4f} {label} static -> "
             f"{out['dynamic_loss']:.4f} nats, {out['dynamic_bpc']:.4f} {label} dynamic "
             f"({out['dynamic_bpc'] - d['static_bpc']:+.4f} {label})",
             f"  on the same stream: {d['protocol']['text']}",
             f"  settings: method {s['method']}, lr {s['lr']:g}, decay {s['decay']:g}, segment {s['segment']}, "
             f"params {', '.join(s['params']) if s['params'] else 'all'} ({s['adapted_weights']:,} weights)"
             + (f", RMS from {s['rms_batches']} training batches of {s['rms_batch_size']} x {s['segment']}"
                if s["method"] == "rms" else "")]
    if "tuning" in d:
        t = d["tuning"]
        lines.append(f"  tuned on the first {t['chars']:,} val chars ({len(t['grid'])} settings): chose lr "
                     f"{s['lr']:g}, decay {s['decay']:g} (" + ", ".join(
                         f"{g['lr']:g}/{g['decay']:g}: " + ("diverged" if g["loss"] is None else f"{g['loss']:.4f}")
                         for g in t["grid"]) + " nats)")
    return lines


def _job(cfg: DictConfig) -> None:
    out = evaluate(cfg)
    print(f"{out['model']} on {cfg.data.path or cfg.data.get('name')} ({cfg.split}): {out['loss']:.4f} nats, "
          f"{out['bpc']:.4f} {unit_label(out['unit'])}, perplexity {out['ppl']:.3f}")
    print(f"yardstick: {out['protocol']['text']}" + (f"; {out['skipped_chars']:,} unknown chars skipped"
                                                      if out["skipped_chars"] else ""))
    if out["partial"]:
        print(f"partial: scored the first {out['scored_chars']:,} of {out['total_chars']:,} {cfg.split} characters "
              "(eval.final_max_chars or eval.max_chars): it does not compare with whole-split figures")
    if "window_loss" in out:
        print(f"nanoGPT-style: {out['window_loss']:.4f} nats (random {out['window']}-char windows, empty state)")
    if cold := cold_start_line(out["cold_start_loss"], out["cold_start_protocol"]):
        print(cold)
    if warning := latch_warning(out["stream_losses"]):
        print(warning)
    if "context_use" in out:
        r = dict(out["context"], **{k: out[k] for k in ("context_use", "full_context_loss", "effective_context")})
        print(f"context used (loss when reading only the last k characters, {r['positions']:,} positions):")
        print("\n".join(summary(r)))
    if "dynamic" in out:
        print("\n".join(dynamic_lines(out, out["unit"])))
    if cfg.json:
        write_json(cfg.json, out)
        print(f"wrote {cfg.json}")


def dynamic_switch(argv: list[str]) -> list[str]:
    """`dynamic=true|false` is `dynamic.enabled=...` (the dynamic.* keys need `dynamic` to stay a section)."""
    return [f"dynamic.enabled={a.split('=', 1)[1]}" if a.split("=", 1)[0] == "dynamic" else a for a in argv]


def main() -> None:
    hydra_main("evaluate", _job, argv_hook=dynamic_switch, check=check)


if __name__ == "__main__":
    main()
