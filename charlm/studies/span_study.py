"""The report's memory-span study: every model trained on `data=recall` (through the builder, as
`python -m charlm.train model=NAME data=recall ...` would) over several seeds, then probed lag by lag
(charlm.studies.probe); the same LSTM at several truncated-BPTT lengths; the gate openings logged while
training (the GateOpenings callback) and the lag-gradient curves at the cue of the trained models,
with the forget-gate claim for a model with an nn.LSTM. Writes memory_span.png/json and gates.png/json;
charlm.studies.span_report draws the figures and writes REPORT.md's section."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from charlm.atomic import finite, write_json
from charlm.cli import CONF_DIR
from charlm.models.contract import capabilities
from charlm.studies.probe import gradient_vs_forget, lag_accuracy, span
from charlm.studies.recall import CUE, RecallAccuracy
from charlm.studies.span_report import LOW, plot_gates, plot_spans
from charlm.training.callbacks import GateOpenings
from charlm.training.gradients import position_grad_norms


def available(models) -> tuple[list[str], list[str]]:
    """(models that have conf/model/NAME.yaml, those that do not), in the given order."""
    names = [models] if isinstance(models, str) else list(models)
    have = [m for m in names if (Path(CONF_DIR) / "model" / f"{m}.yaml").is_file()]
    return have, [m for m in names if m not in have]


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _train(cfg: DictConfig, rp: DictConfig, name: str, seed: int, extra: list[str]):
    """One training run on data=recall and its probe; (record, trained module, data module)."""
    from charlm.studies.quickfit import fit

    t0 = time.perf_counter()
    sizes = {**_plain(rp.model), **_plain((rp.get("model_by_name") or {}).get(name))}
    overrides = [f"model={name}", "data=recall", *[f"data.{k}={v}" for k, v in rp.data.items()], *extra,
                 f"trainer.max_steps={rp.steps}", f"trainer.val_check_interval={rp.val_every}",
                 f"optim.lr={rp.lr.get(name, rp.lr.default)}", "gates_every=1"]
    module, dm, cbs = fit(overrides, sizes, cfg.device, seed=seed)
    acc = [lag_accuracy(module.model, dm.task, lag, rp.n_eval, cfg.seed, rp.prefix) for lag in rp.lags]
    record = {"accuracy": acc, "window": capabilities(module.model).context_size, "block_size": dm.block_size,
              "batch_size": dm.batch_size, "sampling": dm.sampling,
              "params": sum(p.numel() for p in module.model.parameters()),
              "val_recall_acc": [a for _, a in next(c for c in cbs if isinstance(c, RecallAccuracy)).history],
              "gates": next((c.history for c in cbs if isinstance(c, GateOpenings)), []),
              "seconds": time.perf_counter() - t0}
    print(f"report: recall {name} seed {seed}{' ' + ' '.join(extra) if extra else ''}: "
          + " ".join(f"{lag}:{a:.2f}" for lag, a in zip(rp.lags, acc)) + f" ({record['seconds']:.0f} s)")
    return record, module, dm


def _summarise(lags: list[int], by_seed: dict[int, dict], thresholds: tuple) -> dict:
    """Seeds' records -> the model's entry in memory_span.json (mean accuracy, spans of the mean and per seed)."""
    runs = list(by_seed.values())
    mean = [sum(r["accuracy"][i] for r in runs) / len(runs) for i in range(len(lags))]
    return {"lags": list(lags), "accuracy": mean,
            "accuracy_by_seed": {str(s): r["accuracy"] for s, r in by_seed.items()},
            "span": {str(t): span(lags, mean, t) for t in thresholds},
            "span_by_seed": {str(s): {str(t): span(lags, r["accuracy"], t) for t in thresholds}
                             for s, r in by_seed.items()},
            **{k: runs[0][k] for k in ("window", "block_size", "batch_size", "sampling", "params")},
            "val_recall_acc": {str(s): (r["val_recall_acc"] or [None])[-1] for s, r in by_seed.items()},
            "seconds": sum(r["seconds"] for r in runs)}


def _recall_rows(dm, seq_len: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_rows val windows of seq_len whose last input is the cue (the loss there needs the memory): (x, y)."""
    ids = dm.splits["val"].long()
    ends = (ids[seq_len - 1 : -1] == dm.vocab.stoi[CUE]).nonzero().flatten() + seq_len - 1  # cue positions
    ends = ends[torch.linspace(0, len(ends) - 1, min(n_rows, len(ends))).long()]
    w = ids[(ends - seq_len + 1)[:, None] + torch.arange(seq_len + 1)]                    # (n, T+1)
    return w[:, :-1], w[:, 1:]


def _gradient(module, dm, gp: DictConfig) -> dict:
    """Lag-gradient curve at the recall position (its window for a windowed model) and, for a model
    with an nn.LSTM, the forget-gate claim on the same rows."""
    x, y = _recall_rows(dm, gp.seq_len, gp.n_rows)
    window = capabilities(module.model).context_size
    if window is not None:
        x, y = x[:, -window:], y[:, -window:]                                             # (n, W)
    device = next(module.model.parameters()).device
    x, y = x.to(device), y.to(device)
    out = {"curve": position_grad_norms(module.model, x, y).flip(0).cpu().tolist()}
    try:
        out["forget_claim"] = gradient_vs_forget(module.model, x, y, gp.max_lag)
    except TypeError:  # no nn.LSTM in this model
        pass
    return out


def memory_span_study(cfg: DictConfig, preset: DictConfig, out: Path, models: list[str]) -> dict:
    """Each model over `seeds` seeds, the truncated-BPTT runs, gates and gradients; writes the files and
    returns memory_span.json's content with the gates added."""
    rp = preset.recall
    lags = list(rp.lags)
    seeds = [cfg.seed + i for i in range(rp.seeds)]
    thresholds = (float(cfg.span_threshold), LOW)
    results, gates, dm = {}, {}, None
    for name in models:
        by_seed = {}
        for seed in seeds:
            by_seed[seed], module, dm = _train(cfg, rp, name, seed, [])
            if seed == seeds[0]:
                gates[name] = {"history": by_seed[seed]["gates"], **_gradient(module, dm, rp.gradient)}
        results[name] = _summarise(lags, by_seed, thresholds)
    tb = rp.get("tbptt")
    tbptt = {}
    if tb and tb.model in models:
        chars = rp.data.batch_size * rp.data.block_size  # the same characters per step at every block size
        tbptt = {str(rp.data.block_size): results[tb.model]}
        for block in tb.block_sizes:
            extra = [f"data.block_size={block}", f"data.batch_size={max(1, chars // block)}"]
            tbptt[str(block)] = _summarise(lags, {s: _train(cfg, rp, tb.model, s, extra)[0] for s in seeds}, thresholds)
        tbptt = dict(sorted(tbptt.items(), key=lambda kv: int(kv[0])))
    task = {"lags": lags, "thresholds": list(thresholds), "seeds": seeds, "steps": rp.steps, "n_eval": rp.n_eval,
            "prefix": rp.prefix, "chance": 1 / dm.n_symbols, "lr": _plain(rp.lr), "model_sizes": _plain(rp.model),
            "model_by_name": _plain(rp.get("model_by_name")),
            **{k: getattr(dm, k) for k in ("n_symbols", "n_fillers", "p_distract", "max_gap", "min_lag", "max_lag",
                                           "lag_dist", "curriculum_steps", "curriculum_start", "block_size",
                                           "batch_size")}}
    span_json = {"task": task, "models": results,
                 "tbptt": {"model": tb.model, "runs": tbptt} if tbptt else None}
    write_json(out / "memory_span.json", finite(span_json))
    write_json(out / "gates.json", finite(gates))
    plot_spans(span_json, out / "memory_span.png")
    plot_gates(gates, out / "gates.png")
    return {**span_json, "gates": gates}
