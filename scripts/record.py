"""`python scripts/record.py [--parts calibration,train,budgets,compare,report,bench] [--force] [--preset full|tiny]`
(`make record`): every figure the project publishes, regenerated on this machine into results/MACHINE/DATE/,
one process at a time (charlm.bench.record)."""

import sys

from charlm.bench.record import main

if __name__ == "__main__":
    sys.exit(main())
