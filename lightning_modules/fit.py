"""Entry point: `python -m lightning_modules.fit --config configs/demo.yaml [key=value ...]`.

Builds the data (the Mirage World or VLGuard-format files), the model (a Hugging Face id, or the
tiny base pre-trained and cached for the world), the method's LightningModule, and a Lightning
Trainer; validates at step 0, fits, tests, and writes `results.csv` / `results.json` /
`samples.jsonl` in the run directory (`lightning_modules.run.training`). Every fit prints its run
plan first (`lightning_modules.run.plan`). Options: `--plan` (the plan only, no weights loaded),
`--print-config`, `--debug` (full tracebacks).
"""

from __future__ import annotations

from core.errors import cli_main
from lightning_modules.config.loading import config_cli
from lightning_modules.run.plan import print_plan
from lightning_modules.run.training import run


@cli_main
def main(argv: list[str]) -> None:
    config_cli(argv, "python -m lightning_modules.fit", __doc__.splitlines()[0], "configs/demo.yaml", run, plan=print_plan)


if __name__ == "__main__":
    main()
