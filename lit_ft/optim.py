"""Optimizers and learning-rate schedules shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lit_ft.errors import ConfigError
from lit_ft.validation import check_spec


@dataclass
class OptimSpec:
    """Optimizer and schedule; gradient clipping and accumulation are the Trainer's own flags."""

    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = "adamw"
    """torch AdamW, or a bitsandbytes AdamW: paged (optimizer state in CUDA unified memory, QLoRA) or 8-bit."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (Loshchilov & Hutter 2019) on matrices; never on biases or norms."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.03
    """Share of the total optimizer steps spent warming up linearly (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps; overrides warmup_ratio."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a share of `lr`."""

    def __post_init__(self):
        check_spec(self, "model.optim")
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"model.optim.betas={betas!r}: expected two numbers in [0, 1)")


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(named_params, spec: OptimSpec) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.lora / model.base.adapter")
    groups = _param_groups(params, spec.weight_decay)
    kwargs = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"model.optim.optimizer={spec.optimizer!r} needs bitsandbytes (`pip install bitsandbytes`);"
                          " or use 'adamw'") from e

    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[spec.optimizer]
    return cls(groups, **kwargs)


def lr_lambda(spec: OptimSpec, total_steps: int):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay."""
    total = max(int(total_steps), 1)
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.scheduler == "cosine" else 1 - progress
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape

    return fn


def configure(module, spec: OptimSpec, total_steps: int) -> dict:
    """What a LightningModule's `configure_optimizers` returns: the optimizer and a per-step schedule."""
    opt = make_optimizer(module.named_parameters(), spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
