"""Helpers for torchmetrics state inside Lightning's evaluation loops."""

from __future__ import annotations

import torch


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
