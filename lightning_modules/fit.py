"""Entry point: `python -m lightning_modules.fit --config configs/demo.yaml [key=value ...]`.

Builds the data (the Mirage World or VLGuard-format files), the model (a Hugging Face id, or the
tiny base pre-trained and cached for the world), the method's LightningModule, and a Lightning
Trainer; validates at step 0, fits, tests, and writes `results.csv` / `results.json` /
`samples.jsonl` in the run directory. Options: `--print-config`, `--debug` (full tracebacks).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from datamodules.safety import resolve_data_files
from lightning_modules.backbone import build_backbone
from lightning_modules.base import get_method
from lightning_modules.config import load_config, to_yaml
from lightning_modules.errors import UserError, cli_main

RUN_DIR_ENV = "SAFETY_MIRAGE_RUN_DIR"  # DDP re-runs this script per rank: all ranks share rank 0's dir
RESULT_COLUMNS = ["asr", "refusal_rate", "ir", "accuracy", "n"]


def prepare_run_dir(cfg) -> Path:
    """The run directory, writable; a finished run's results are never overwritten (a new
    `_N` suffix is taken unless resuming)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:
        n, base = 1, run_dir
        while (run_dir / "results.csv").exists():
            run_dir, n = base.with_name(f"{base.name}_{n}"), n + 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run_dir '{run_dir}' is not writable: {err.strerror}") from err
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def build_trainer(cfg, run_dir: Path) -> L.Trainer:
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=cfg.checkpoint.save_last,
                                 save_top_k=cfg.checkpoint.save_top_k,
                                 every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.setdefault("default_root_dir", str(run_dir))
    # Our samplers shard data themselves (eval without padding): Lightning must not replace them.
    kwargs["use_distributed_sampler"] = False
    try:
        return L.Trainer(logger=logger, callbacks=[checkpoint, LearningRateMonitor("step")], **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"invalid trainer config: {str(err).splitlines()[0]}") from err


def results_table(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(results, orient="index").reindex(columns=RESULT_COLUMNS)
    table.index.name = "eval_set"
    return table


def write_results(run_dir: Path, module) -> pd.DataFrame:
    table = results_table(module.test_results)
    table.to_csv(run_dir / "results.csv")
    (run_dir / "results.json").write_text(json.dumps(module.test_results, indent=1))
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as fh:
        for row in module.generations:
            fh.write(json.dumps(row) + "\n")
    return table


def resolve_checkpoint(cfg, run_dir: Path):
    if not cfg.resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if str(cfg.resume) in ("last", "true", "True") else Path(cfg.resume)
    if not path.is_file():
        raise UserError(f"resume checkpoint not found: {path}")
    return str(path)


def build_run(cfg):
    """(module, datamodule) for a validated config; also used by `evaluate` and `compare`."""
    files = resolve_data_files(cfg.data)
    if cfg.model.name_or_path == "tiny" and files.world_dir is not None:
        from lightning_modules.pretrain import ensure_tiny_base

        cfg.model.name_or_path = str(ensure_tiny_base(cfg, files))
    texts = None
    if cfg.model.name_or_path == "tiny":
        from lightning_modules.pretrain import corpus_texts

        texts = corpus_texts(files, [files.compliance_cue, files.refusal_cue])
    model, processor = build_backbone(cfg.model, texts)
    method = get_method(cfg.method.name)
    module = method(model, processor, cfg)
    data = method.datamodule_class(cfg.data, files, processor, seed=cfg.seed)
    return module, data


def run(cfg) -> pd.DataFrame | None:
    run_dir = prepare_run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    module, data = build_run(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    trainer = build_trainer(cfg, run_dir)
    ckpt_path = resolve_checkpoint(cfg, run_dir)
    if cfg.eval.val_at_start and ckpt_path is None:
        trainer.validate(module, data, verbose=False)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        target = run_dir / "model"
        module.model.save_pretrained(target)
        module.processor.save_pretrained(target)
    if not cfg.eval.test_at_end:
        return None
    trainer.test(module, data, verbose=False)
    if trainer.global_rank != 0:
        return None
    table = write_results(run_dir, module)
    print(f"\nresults on the test split ({run_dir}/results.csv):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return table


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.fit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/demo.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    return parser.parse_args(argv), []


@cli_main
def main(argv: list[str]) -> None:
    args, _ = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return
    run(cfg)


if __name__ == "__main__":
    main()
