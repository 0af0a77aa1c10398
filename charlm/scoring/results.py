"""The end of a training run: the best checkpoint scored with the yardstick (and the nanoGPT-style figure, the
cold-start loss), results.json, the printed report, the W&B summary and the end-of-run explain page.

`charlm.train` fits; this module scores and writes. It sits with the builder (it reads a `Built`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from charlm.atomic import finite, write_json
from charlm.checkpoint import command_targets, read_checkpoint
from charlm.data.vocab import unit_label
from charlm.explain import explain_run
from charlm.generate import readable, samples
from charlm.scoring.cold_start import cold_start_line, cold_start_loss
from charlm.training.budget import budget_record, final_lr, tokens_per_step
from charlm.training.build import Built
from charlm.training.callbacks import TrainClock
from charlm.training.module import load_charlm
from charlm.yardstick import latch_warning, protocol, score_rows, stream_means, window_loss


def evaluate_best(built: Built, best_path: str, cfg: DictConfig) -> dict:
    """The best checkpoint on the yardstick (exact, over the whole val split, or its first eval.final_max_chars
    characters: a partial figure, said so; eval.max_chars bounds only the validations during training) and the
    nanoGPT-style window figure; the model that produced them. A progress bar counts the characters scored."""
    t0 = time.perf_counter()
    best = load_charlm(best_path, trusted=command_targets(cfg))
    device = built.module.device
    model = best.model.to(device).eval()
    batches = built.dm.eval_dataset("val", final=True)
    whole = len(built.dm.splits["val"]) - 1  # what the whole split scores: every character but the first
    bound = f" (first {batches.targets:,} of {whole:,} val chars)" if batches.targets < whole else ""
    rows, counts = score_rows(model, batches, device, progress="final evaluation" + bound)
    total, chars = float(rows.sum()), int(counts.sum())
    loss = total / max(chars, 1)
    c = built.dm.eval_cfg
    out = {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0)),
           "protocol": protocol(c["context_size"], c["streams"], c["chunk"], c["stride"], chars), "model": best,
           "stream_losses": stream_means(batches, rows, counts),
           "partial": chars < whole, "scored_chars": chars, "total_chars": whole}
    if cfg.eval.window_batches:
        window = min(cfg.eval.window, c["context_size"] or cfg.eval.window)
        out["window"] = window_loss(model, built.dm.eval_ids("val", whole=True), window, cfg.eval.window_batches,
                                    seed=cfg.seed, device=device)
    out["cold_start"] = cold_start_loss(model, built.dm.eval_ids("val", whole=True), device=device)
    out["seconds"] = time.perf_counter() - t0
    return out


def results_of(built: Built, cfg: DictConfig, run_dir: Path, resume: dict | None, started: float) -> dict:
    """Evaluate the best checkpoint, sample from it, and gather what results.json holds."""
    trainer, ckpt_cb = built.trainer, built.trainer.checkpoint_callback
    ckpt_dir = run_dir / "checkpoints"
    best_path = (ckpt_cb.best_model_path if ckpt_cb else "") or str(ckpt_dir / "last.ckpt")
    ev = evaluate_best(built, best_path, cfg)
    best_step = read_checkpoint(best_path).get("global_step")
    last_val = trainer.callback_metrics.get("val/loss")
    clock = built.callback(TrainClock)
    seconds = clock.train_seconds if clock else None
    steps_run = trainer.global_step - (resume["global_step"] if resume else 0)
    tokens = steps_run * tokens_per_step(cfg.data.batch_size, cfg.data.block_size, trainer.world_size,
                                         trainer.accumulate_grad_batches)
    budget_clock = built.clock
    # as charlm.sample samples (a byte model reads the prompt's UTF-8 bytes), but what the vocabulary lacks is
    # dropped: the budget is spent, so this must not fail; stored as text (bytes decoded as UTF-8)
    vocab, g = ev["model"].vocab, torch.Generator().manual_seed(cfg.seed)
    sample = readable(vocab, samples(ev["model"].model.cpu(), vocab, str(cfg.sample.prompt).replace("\\n", "\n"),
                                     300, cfg.sample.temperature, generator=g, unknown="skip")[0])
    window = ev.get("window") or {}
    return {
        "model": built.model_name,
        "params": built.params,
        "best_val_loss": finite(ev["loss"]),
        "best_val_bpc": finite(ev["bpc"]),
        "best_val_ppl": finite(ev["ppl"]),
        "best_step": best_step,
        "protocol": ev["protocol"],
        "stream_losses": ev["stream_losses"],
        "partial": ev["partial"],  # eval.final_max_chars: scored_chars of the total_chars val characters
        "scored_chars": ev["scored_chars"],
        "total_chars": ev["total_chars"],
        "last_val_loss": finite(float(last_val)) if last_val is not None else None,
        "window_val_loss": finite(window.get("loss")),
        "window_val_bpc": finite(window.get("bpc")),
        "window_protocol": {k: window[k] for k in ("window", "windows", "seed")} if window else None,
        "cold_start_loss": finite(ev["cold_start"]["loss"]),
        "cold_start_se": finite(ev["cold_start"]["se"]),
        "cold_start_protocol": ev["cold_start"]["protocol"],
        "best_ckpt": str(Path(best_path).resolve()),
        "last_ckpt": str((ckpt_dir / "last.ckpt").resolve()),
        "steps": trainer.global_step,
        "tokens": tokens,
        "budget": budget_record(cfg, trainer),
        "budget_seconds_used": finite(budget_clock.elapsed()) if budget_clock and budget_clock.seconds else None,
        "final_lr": final_lr(trainer),
        "startup_seconds": finite(clock.start - started) if clock and clock.start else None,
        "final_eval_seconds": finite(ev["seconds"]),
        "tokens_per_s": finite(tokens / seconds) if seconds else None,
        "train_seconds": finite(seconds),
        "world_size": trainer.world_size,
        "vocab_size": len(built.dm.vocab),
        "unit": built.dm.vocab.unit,
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "sampling": built.dm.sampling,
        "sample": sample,
        # older names of best_val_loss / best_val_bpc, kept for scripts that read them
        "val_loss": finite(ev["loss"]),
        "val_bpc": finite(ev["bpc"]),
    }


def report(results: dict, run_dir: Path) -> None:
    p = results["protocol"]
    print(f"\ncheckpoint: {results['best_ckpt']} (step {results['best_step']})")
    unit = unit_label(results.get("unit", "char"))
    print(f"val {results['best_val_loss']:.4f} nats, {results['best_val_bpc']:.4f} {unit} on the yardstick "
          f"({p['text']})")
    if results.get("partial"):
        print(f"partial: scored the first {results['scored_chars']:,} of {results['total_chars']:,} val characters "
              "(eval.final_max_chars): it does not compare with whole-split figures")
    if results["window_val_loss"] is not None:
        print(f"nanoGPT-style: {results['window_val_loss']:.4f} nats (random {results['window_protocol']['window']}"
              f"-char windows, empty state)")
    if cold := cold_start_line(results.get("cold_start_loss"), results.get("cold_start_protocol")):
        print(cold)
    if warning := latch_warning(results.get("stream_losses")):
        print(warning)
    tps = results["tokens_per_s"]
    print(f"{results['steps']} steps, {tps:,.0f} train tokens/s" if tps else f"{results['steps']} steps")
    b = results["budget"]
    if b["kind"] != "steps":
        size = f"{b['seconds']:g} s" if b["kind"] == "seconds" else f"{b['tokens']:,} tokens"
        used = results["budget_seconds_used"]
        print(f"budget {size}" + (f" ({used:.1f} s used)" if used else "") + f", final lr {results['final_lr']:.3g}; "
              f"start-up {results['startup_seconds'] or 0:.1f} s and the exact evaluation "
              f"{results['final_eval_seconds']:.1f} s outside it")
    print(f"results:    {run_dir / 'results.json'}")
    print("sample:\n" + "-" * 40 + "\n" + results["sample"] + "\n" + "-" * 40)


def summarize_wandb(built: Built, results: dict) -> None:
    """The final figure in the W&B run's summary, saying whether it scored the whole val split, and the
    cold-start loss beside it."""
    keys = ("best_val_loss", "best_val_bpc", "partial", "scored_chars", "total_chars", "cold_start_loss")
    for lg in built.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({k: results[k] for k in keys if k in results})


def finish_wandb(built: Built, failed: bool) -> None:
    """Close the W&B run (else the next run in this process, a sweep's next job, logs into it)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in built.loggers):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


def score_run(built: Built, cfg: DictConfig, run_dir: Path, resume: dict | None, started: float) -> dict:
    """Score the finished run, write results.json, print the report, fill the W&B summary and (with
    explain.n_chars > 0) write the explain page, logged before W&B closes; the results."""
    results = results_of(built, cfg, run_dir, resume, started)
    write_json(run_dir / "results.json", results)
    summarize_wandb(built, results)
    report(results, run_dir)
    explain_run(cfg, built, results, run_dir)
    return results
