"""`python -m charlm.report [size=tiny|cpu|gpu] [out_dir=reports]`: the report's entry point.

The studies and REPORT.md are written by charlm.studies.report."""

from charlm.studies.report import main

if __name__ == "__main__":
    main()
