"""A plain two-layer module fitted under FSDP2 (Lightning's ModelParallelStrategy, our atomic
subclass) on CPU processes, with sharded checkpoints; argv: run_dir max_steps fault [resume].
fault: none | full_disk (rank 1's shard write fails with ENOSPC) | nan (rank 1's shard of the
step-4 checkpoint holds NaN).
Run as a script: Lightning re-runs it for rank 1."""

from __future__ import annotations

import errno
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from core.errors import UserError
from lightning_modules.run.checkpointing import AtomicCheckpointIO, AtomicModelParallelStrategy, VerifiedCheckpoints


class Plain(L.LightningModule):
    def __init__(self, fault: str):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        self.fault = fault

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "sharded", False):  # called at every stage: fully_shard only once
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.sharded = True

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).pow(2).mean()

    def on_save_checkpoint(self, checkpoint):
        if self.fault == "nan" and self.global_step == 4 and self.global_rank == 1:  # rank 1's shard only
            with torch.no_grad():
                checkpoint["state_dict"]["model.0.weight"].to_local().fill_(float("nan"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def inject(fault: str, rank: int) -> None:
    from torch.distributed.checkpoint import filesystem

    real = filesystem._FileSystemWriter.write_data if hasattr(filesystem, "_FileSystemWriter") else \
        filesystem.FileSystemWriter.write_data
    owner = filesystem._FileSystemWriter if hasattr(filesystem, "_FileSystemWriter") else filesystem.FileSystemWriter
    calls = {"n": 0}

    def write_data(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (step 3)
            if fault == "full_disk" and rank == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    owner.write_data = write_data


def main() -> int:
    run_dir, max_steps, fault = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    inject(fault, int(os.environ.get("LOCAL_RANK", 0)))
    io = AtomicCheckpointIO()
    strategy = AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                           save_distributed_checkpoint=True, timeout=timedelta(seconds=60))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[io], max_steps=max_steps,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(run_dir), use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                                   every_n_train_steps=1), VerifiedCheckpoints(io)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=4)
    try:
        trainer.fit(Plain(fault), data, ckpt_path=resume, weights_only=True)
    except UserError as err:
        print(f"error: rank {trainer.global_rank}: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
