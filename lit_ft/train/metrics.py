"""Helpers for torchmetrics state inside Lightning's evaluation loops, and sample tables for the loggers."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def fresh(*metrics) -> None:
    """Reset metric states as normal (non-inference) tensors.

    `trainer.validate` runs under `torch.inference_mode`; a reset there leaves inference tensors that a later
    `fit` (whose validation may run without inference mode) cannot update in place. Call from
    `on_validation_epoch_start`.
    """
    with torch.inference_mode(False):
        for metric in metrics:
            metric.reset()


def split_name(module) -> str:
    """The metric prefix of an evaluation pass: `test` under `trainer.test` (the validation steps scoring the test
    file), `val` otherwise."""
    trainer = getattr(module, "_trainer", None)
    return "test" if getattr(trainer, "testing", False) else "val"


class GroupAccuracy:
    """Pair accuracy per validation subset (`PreferenceDataModule(group_field=...)`), as reward benchmarks report
    it: (correct, pairs) summed per subset on each rank, then over the ranks at the epoch's end. The subsets are the
    datamodule's `val_groups`, the same sorted list on every rank."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # subset -> row of `counts`
        self.counts = torch.zeros(0, 2, dtype=torch.float64)

    def start(self, module) -> None:
        """`on_validation_epoch_start`: the datamodule's subsets, every count at zero."""
        groups = getattr(module.trainer.datamodule, "val_groups", None) or []
        self.index = {g: i for i, g in enumerate(groups)}
        self.counts = torch.zeros(len(groups), 2, dtype=torch.float64, device=module.device)

    def update(self, batch: dict, correct: torch.Tensor) -> None:
        """Count a batch's pairs under their `group` (`correct` ``[pairs]``: 1 where the chosen response won)."""
        if self.index and "group" in batch:
            index = torch.tensor([self.index[g] for g in batch["group"]], device=correct.device)
            correct = correct.double()
            self.counts.index_add_(0, index, torch.stack([correct, torch.ones_like(correct)], dim=1))

    def log(self, module, prefix: str) -> None:
        """`<prefix>/<subset>` for every subset that had pairs in this epoch."""
        if not self.index:
            return
        counts = module.trainer.strategy.reduce(self.counts, reduce_op="sum")
        for group, i in self.index.items():
            if counts[i, 1] > 0:
                module.log(f"{prefix}/{group}", (counts[i, 0] / counts[i, 1]).float())


@rank_zero_only
def log_table(trainer, key: str, columns: list[str], rows: list[list]) -> None:
    """A W&B table of samples, when a W&B logger is attached (rank zero only)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key, columns=columns, data=rows, step=trainer.global_step)
