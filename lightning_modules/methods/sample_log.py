"""Sample generations logged during validation and test: a table with the images where the logger
can show one (W&B Table; TensorBoard text plus one image per sample), JSON lines
(`<stage>_samples.jsonl` in the logger's folder) elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image

from core.files import append_lines

THUMBNAIL = 256  # longest side of a logged sample image, in pixels


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(img)
    except OSError:
        return None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def log_samples(loggers: list[Logger], stage: str, samples: dict[str, list[dict]], step: int) -> None:
    """Sample generations per eval set (`{"prompt", "response", "image"}` rows) to every logger."""
    if not samples:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for name, rows in samples.items():
                table = ["| # | prompt | response |", "|---|---|---|"]
                table += [f"| {i} | {_cell(r['prompt'])} | {_cell(r['response'])} |" for i, r in enumerate(rows)]
                writer.add_text(f"{stage}_samples/{name}", "\n".join(table), step)
                for i, r in enumerate(rows):
                    pixels = _thumbnail(r["image"]) if r.get("image") else None
                    if pixels is not None:
                        writer.add_image(f"{stage}_samples/{name}/{i}", pixels, step, dataformats="HWC")
        elif type(logger).__name__ == "WandbLogger":
            import wandb

            data = [[name, wandb.Image(r["image"]) if r.get("image") else None, r["prompt"], r["response"]]
                    for name, rows in samples.items() for r in rows]
            logger.log_table(key=f"{stage}_samples", columns=["eval_set", "image", "prompt", "response"],
                             data=data, step=step)
        elif getattr(logger, "log_dir", None):
            append_lines(Path(logger.log_dir) / f"{stage}_samples.jsonl",
                         [json.dumps({"step": step, "eval_set": name, **r}, ensure_ascii=False)
                          for name, rows in samples.items() for r in rows], what="sample log", durable=False)
