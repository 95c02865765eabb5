"""Several `fit` runs in one pair of processes, started as torchrun starts them (LOCAL_RANK, NODE_RANK,
MASTER_ADDR/PORT in the environment: Lightning then launches nothing and joins the process group,
which later runs reuse). Each rank runs the same list of runs in order; a run is exactly what the
fit CLI runs (`lightning_modules.run.training.run` on the loaded config). Starting two Python
processes per run would cost more than the runs themselves.

    python tests/strategy_runs.py runs.json      # runs.json: {"runs": [[override, ...], ...]}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from lightning_modules.config.loading import load_config
    from lightning_modules.run.run_dir import RUN_DIR_ENV
    from lightning_modules.run.training import run

    runs = json.loads(Path(sys.argv[1]).read_text())["runs"]
    for i, overrides in enumerate(runs):
        os.environ.pop(RUN_DIR_ENV, None)  # each run picks (rank 0) or is given (the others) its own directory
        run(load_config(REPO / "configs" / "demo.yaml", overrides))
        print(f"rank {os.environ['LOCAL_RANK']}: run {i} done", flush=True)


if __name__ == "__main__":
    main()
