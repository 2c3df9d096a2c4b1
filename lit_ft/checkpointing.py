"""Slim, self-describing Lightning checkpoints: trainable state only, plus the identity of the frozen base."""

from __future__ import annotations

import torch

from lit_ft.errors import ConfigError
from lit_ft.models import trainable_state_dict

IDENTITY_KEY = "lit_ft_base"


def slim(module: torch.nn.Module, checkpoint: dict, identity: dict) -> None:
    """Keep only trainable tensors in `checkpoint["state_dict"]` and record which base they belong to.

    Call from `on_save_checkpoint`. The frozen base is never written: a LoRA checkpoint is a small fraction
    of the base model's size.
    """
    checkpoint["state_dict"] = trainable_state_dict(module)
    checkpoint[IDENTITY_KEY] = identity


def check_identity(checkpoint: dict, identity: dict) -> None:
    """Refuse to load adapters onto a different base. Call from `on_load_checkpoint`."""
    saved = checkpoint.get(IDENTITY_KEY)
    if saved is None:
        return
    diff = {k: (saved.get(k), identity.get(k)) for k in identity if saved.get(k) != identity.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the checkpoint was trained on another base model ({lines}); set model.base to match or start a new run"
        )
