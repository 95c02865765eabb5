"""Entry point: `python -m lightning_modules.evaluate --config configs/evaluate/vlguard_paper.yaml [key=value ...]`.

Evaluates one model -- a Hugging Face id, a local `save_pretrained` directory or `tiny`; plus, if
given, a LoRA adapter (`model.finetune=lora model.adapter_path=DIR`) or a Lightning checkpoint of
`fit` (`evaluate.checkpoint=last.ckpt`) -- on VLGuard-format files: the test subsets `unsafes`,
`safe_unsafes`, `safe_safes`, and K-shot rewrite files (records sharing an id are the K rewrites).

1. generate (`lightning_modules.analysis.predict`): greedy, batched, left-padded answers from the same
   `greedy_generate` the validation hooks use, on the device Lightning's Fabric picks. Each batch's lines are appended to
   `samples.jsonl` and flushed; a restarted run skips every (set, id, subset, shot, prompt)
   already there, so an interrupted evaluation resumes where it stopped.
2. judge: refusal by keyword preset (`eval.refusal_preset`); harmful compliance of the non-refused
   answers to unsafe queries by `evaluate.judge.name`: keyword (every non-refusal), reference
   (the record's harmful_keywords, Mirage World) or vlm (the official Qwen2.5-VL judge, cached).
3. tables: `results.csv`, `results.md`, `results.json` -- ASR / IR / RR / accuracy per set,
   subset, shot (and any-of-K) and harmful category, with bootstrap CIs, and the configured gaps.

A suite (`--config configs/evaluate/suite_<name>.yaml`, `evaluate.tasks`) runs every task -- safety
files with the one-word attack mined on the training set, utility benchmarks with their official
scorers -- in `run_dir/tasks/<name>/`, resumable per task, and writes `results.csv` with a `task`
column; `evaluate.models=[...]` runs it on several models (hub ids, directories, LoRA adapters, fit
checkpoints, or suites already run, read back) and puts them side by side
(`lightning_modules.analysis.suite`, `suite_models`, `suite_tables`).

On several devices (`trainer.devices=N`; on the CPU `trainer.accelerator=cpu trainer.strategy=ddp`
starts N gloo processes) rank 0 runs the command and every rank answers its shard of each generation
and of the VLM judge: the same samples.jsonl and results as one process (`lightning_modules.run.ranks`).

Options: `--print-config`, `--debug` (full tracebacks).
"""

from __future__ import annotations

from core.errors import UserError, cli_main
from lightning_modules.analysis import evaluation
from lightning_modules.analysis.suite_models import evaluate_suite
from lightning_modules.config.loading import config_cli
from lightning_modules.config.schema import EvaluateConfig
from lightning_modules.run.ranks import on_ranks


def evaluate(cfg, judge=None):
    """The files mode (`evaluate.files`) or the suite mode (`evaluate.tasks`, `evaluate.models`), on
    the processes `trainer.devices` asks for (rank 0 leads; the others answer their shards)."""
    settings = evaluation.read_settings(cfg)
    if settings.tasks:
        return on_ranks(cfg, lambda: evaluate_suite(cfg, judge))
    if settings.models:
        raise UserError("evaluate.models (models side by side) needs a suite: list evaluate.tasks")
    return on_ranks(cfg, lambda: evaluation.evaluate(cfg, judge))


@cli_main
def main(argv: list[str]) -> None:
    config_cli(argv, "python -m lightning_modules.evaluate", __doc__.splitlines()[0],
               "configs/evaluate/vlguard_paper.yaml", evaluate, EvaluateConfig)


if __name__ == "__main__":
    main()
