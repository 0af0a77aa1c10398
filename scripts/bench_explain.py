"""`python scripts/bench_explain.py [N ...]` (default: 2000 20000): `charlm.explain`'s wall time, start-up
included, for two untrained 1x384 LSTMs on the first N val characters of tiny shakespeare (charlm.bench.explain)."""

import sys

from charlm.bench.explain import main

if __name__ == "__main__":
    main(sys.argv[1:])
