"""`python -m qvl_pipeline.bench [overrides...]`: the same as `python -m qvl_pipeline task=bench [overrides...]`
(kept for old scripts; the benchmark is a task of the CLI now)."""

from __future__ import annotations

import sys

from qvl_pipeline.__main__ import main

if __name__ == "__main__":
    sys.argv[1:] = ["task=bench", *sys.argv[1:]]
    main()
