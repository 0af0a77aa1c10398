"""What dynamic evaluation costs on this machine, against training:
`python scripts/bench_dynamic.py RUN_DIR [evaluate overrides: dynamic.segment=100 eval.max_chars=N ...]`.

Times, on the val split of the run's corpus read as one stream (charlm.scoring.dynamic): the RMS statistics,
the static pass and the dynamic pass (one forward and one backward per segment), then sets the dynamic pass
against the run's own training speed (RUN_DIR/results.json `tokens_per_s`) for as many characters. Run it alone,
on the thread count the run trained with: every other process on the machine is in the figure.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from charlm.checkpoint import load_model
from charlm.cli import compose
from charlm.evaluate import corpus_ids, dynamic_inputs, split_of
from charlm.models.contract import capabilities
from charlm.scoring.dynamic import adapted_params, gradient_rms, learning_rates, rms_batches, run_dynamic, segments
from charlm.yardstick import score


def main(run_dir: Path, overrides: list[str]) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    ckpt = run_dir / "checkpoints" / Path(results.get("best_ckpt") or "best.ckpt").name
    cfg = compose("evaluate", [f"ckpt_path={ckpt}", "dynamic.enabled=true", *overrides])
    model, vocab, _ = load_model(ckpt)
    ids, _ = corpus_ids(cfg, vocab)
    ids = split_of(ids, cfg.split, cfg.data.val_fraction, cfg.data.get("test_fraction", 0.0))
    ids = ids[: cfg.eval.max_chars] if cfg.eval.max_chars else ids
    d, inputs = cfg.dynamic, dynamic_inputs(cfg, vocab, ids)
    context = capabilities(model).context_size
    batches = segments(inputs["ids"], context, d.segment)
    params = [p for _, p in adapted_params(model, None if d.params is None else list(d.params))]
    seconds = {}
    t0 = time.perf_counter()
    rms = gradient_rms(model, rms_batches(inputs["train"], context, d, cfg.seed), params, d.rms_batches, "cpu") \
        if d.method == "rms" else None
    seconds["rms statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, chars = score(model, batches)
    seconds["static pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_dynamic(model, params, batches, d.method, learning_rates(d)[0], float(d.decay), float(d.eps), rms, "cpu")
    seconds["dynamic pass"] = time.perf_counter() - t0
    train = chars / results["tokens_per_s"]
    print(f"{results.get('model', '?')}: {chars:,} val chars, one stream, segment {d.segment}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    for name, s in seconds.items():
        print(f"  {name}: {s:.1f} s ({chars / s:,.0f} chars/s)" if name != "rms statistics" else f"  {name}: {s:.1f} s")
    print(f"  training on as many tokens ({results['tokens_per_s']:,.0f} tok/s in its run): {train:.1f} s")
    print(f"  dynamic pass / training: {seconds['dynamic pass'] / train:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "results.json").is_file():
        sys.exit("usage: python scripts/bench_dynamic.py RUN_DIR [evaluate overrides]  (RUN_DIR holds results.json)")
    main(Path(sys.argv[1]), sys.argv[2:])
