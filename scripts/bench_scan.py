"""`python scripts/bench_scan.py [--batch 32] [--seq 256] [--repeats 5]`: charlm's scans and modern blocks
against a Python loop over time (charlm.bench.scan)."""

from charlm.bench.scan import main

if __name__ == "__main__":
    main()
