"""`python scripts/time_to_quality.py [--thresholds 1.45,1.40] TRAIN_OVERRIDES... hydra.run.dir=DIR`

`python -m charlm.train TRAIN_OVERRIDES` (charlm.train.run on the composed config, trainer picked as
charlm.train picks it), with one more Lightning callback that notes, at the end of every validation, the
yardstick `val/loss` and the wall time: since this process started (start-up, compilation and earlier
validations included, as nanoGPT's "183 s" is) and of training alone. Prints and writes
DIR/time_to_quality.json: the first validation at or below each threshold, the best checkpoint's
yardstick, and the nanoGPT-style `window_val_loss` of results.json.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the imports: wall times count start-up

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402


def val_clock():
    """charlm's training clock (charlm.training.callbacks.TrainClock: training seconds without validation),
    noting at the end of each validation (step, val/loss, wall since process start, training seconds so far)."""
    from charlm.training.callbacks import TrainClock

    class ValClock(TrainClock):
        def __init__(self):
            super().__init__()
            self.points = []

        def on_validation_end(self, trainer, pl_module):
            super().on_validation_end(trainer, pl_module)  # synced, and this validation's time set aside
            now = time.perf_counter()
            loss = trainer.callback_metrics.get("val/loss")
            if trainer.sanity_checking or loss is None or self.start is None:
                return
            self.points.append({"step": trainer.global_step, "val_loss": float(loss), "wall_s": now - T0,
                                "train_s": now - self.start - self.val})

    return ValClock()


def first_below(points: list[dict], threshold: float) -> dict | None:
    return next((p for p in points if p["val_loss"] <= threshold), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--thresholds", default="1.45,1.40", help="yardstick val/loss levels (nats)")
    p.add_argument("overrides", nargs="*", help="train overrides, hydra.run.dir=DIR among them")
    a = p.parse_args()
    thresholds = [float(t) for t in a.thresholds.split(",") if t]
    run_dirs = [o.split("=", 1)[1].strip("'\"") for o in a.overrides if o.startswith("hydra.run.dir=")]
    if not run_dirs:
        p.error("hydra.run.dir=DIR is required")
    run_dir = Path(run_dirs[-1])
    overrides = [o for o in a.overrides if not o.startswith("hydra.")]

    from omegaconf import open_dict

    from charlm.cli import compose, report_user_errors
    from charlm.train import pick_trainer, run
    from charlm.training import rundir

    clock = val_clock()
    with report_user_errors():
        cfg = compose("train", pick_trainer(overrides), return_hydra_config=True)
        model_name = str(cfg.hydra.runtime.choices.get("model", "model"))  # as charlm.train names the run
        with open_dict(cfg):
            del cfg["hydra"]
        run_dir.mkdir(parents=True, exist_ok=True)
        with rundir.tee(run_dir / "train.log"):
            results = run(cfg, run_dir, model_name, extra_callbacks=[clock])
    out = {"overrides": overrides, "thresholds": {}, "points": clock.points,
           "best_val_loss": results.get("best_val_loss"), "window_val_loss": results.get("window_val_loss"),
           "window_protocol": results.get("window_protocol"), "protocol": results.get("protocol"),
           "params": results.get("params"), "steps": results.get("steps"), "tokens_per_s": results.get("tokens_per_s"),
           "device": results.get("device"), "precision": results.get("precision"),
           "process_wall_s": time.perf_counter() - T0}
    lines = []
    for t in thresholds:
        hit = first_below(clock.points, t)
        out["thresholds"][f"{t:g}"] = hit
        lines.append(f"val/loss <= {t:g}: " + (f"at step {hit['step']}, {hit['wall_s']:.1f} s wall from process start "
                                               f"({hit['train_s']:.1f} s of training)" if hit else "not reached"))
    (run_dir / "time_to_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    best, window = out["best_val_loss"], out["window_val_loss"]
    print("\ntime to quality (the yardstick's val/loss at each validation):\n  " + "\n  ".join(lines))
    print(f"  best checkpoint: {best:.4f} on the yardstick" + (f", nanoGPT-style {window:.4f}" if window else "")
          + f"; process wall {out['process_wall_s']:.1f} s")
    print(f"written: {run_dir / 'time_to_quality.json'}")


if __name__ == "__main__":
    main()
