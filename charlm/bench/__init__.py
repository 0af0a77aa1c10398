"""The measurements behind `make bench` and `make record`: charlm against a bare PyTorch loop (plan, child,
runs, window, tables), sampling and scan speeds, charlm.explain's wall time, and the record of every published
figure (record, record_summary). The commands live in scripts/ (bench.py, record.py, bare_loop.py, ...); they
read conf/ and the corpus from the checkout this package sits in."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: conf/, scripts/, charlm/corpora/
