"""`python scripts/bench.py [--preset cpu|gpu] [--models lstm,mingru] [--modes auto|random,stream] [--out DIR]`
(`make bench`): charlm's training tokens/s and memory against a bare PyTorch loop, sampling, scans and corpus
encoding on this machine (charlm.bench.plan; docs/bench.md explains the figures)."""

from charlm.bench.plan import main

if __name__ == "__main__":
    main()
