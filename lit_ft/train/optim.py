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
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): the LoRA B matrices train at `lr` x this ratio (the paper and PEFT suggest 16), the
    A matrices and everything else at `lr`; None = one lr for all."""

    def __post_init__(self):
        check_spec(self, "model.optim")
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"model.optim.betas={betas!r}: expected two numbers in [0, 1)")


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], spec: OptimSpec) -> list[dict]:
    """Decay on matrices only; with LoRA+, the B matrices in groups of their own at `lr` x the ratio (`lr_scale`,
    which the resume rule keeps: `apply_on_resume`)."""
    ratio = spec.loraplus_lr_ratio

    def is_b(name: str) -> bool:
        return ratio is not None and ("lora_B" in name or "lora_embedding_B" in name)

    groups = []
    for b_side in (False, True) if ratio is not None else (False,):
        scale = float(ratio) if b_side else 1.0
        mine = [(n, p) for n, p in params if is_b(n) == b_side]
        groups += [{"params": [p for _, p in mine if p.ndim >= 2], "weight_decay": spec.weight_decay,
                    "lr": spec.lr * scale, "lr_scale": scale},
                   {"params": [p for _, p in mine if p.ndim < 2], "weight_decay": 0.0,
                    "lr": spec.lr * scale, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(named_params, spec: OptimSpec) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.lora / model.base.adapter")
    groups = _param_groups(params, spec)
    kwargs = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, **kwargs, **_implementation([p for _, p in params]))
        # Fused AdamW offers to unscale fp16 gradients inside its kernel; Lightning's mixed-precision plugin then
        # refuses gradient clipping (it cannot clip gradients still scaled). Declined: a GradScaler unscales them
        # first as for any optimizer, and bf16 has no scale at all.
        opt._step_supports_amp_scaling = False
        return opt
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


def _implementation(params: list[torch.Tensor]) -> dict:
    """torch AdamW's fused kernel where it applies: every parameter a plain floating-point tensor on one CUDA or CPU
    device (one pass over all parameters instead of a dozen multi-tensor ops, or one loop per tensor on the CPU:
    3-5x faster on the CPU for the 420 LoRA matrices of a 135M model). Elsewhere (sharded DTensor parameters,
    mixed devices) torch's own default."""
    devices = {p.device for p in params}
    plain = all(type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return {"fused": True} if plain and len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu") else {}


def _decay(spec: OptimSpec, progress: float) -> float:
    """The decay's shape at `progress` in [0, 1]: 1 -> 0 (cosine or linear), or 1 throughout (constant)."""
    if spec.scheduler == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * progress)) if spec.scheduler == "cosine" else 1 - progress


def lr_lambda(spec: OptimSpec, total_steps: int, resume: dict | None = None):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay.

    `resume` (filled in after a restore by `apply_on_resume` when the run's length changed) holds `step` and `mult`:
    from that step on, the decay continues from the multiplier the schedule had reached and ends at the floor at
    the new `total_steps`, so extending `max_steps` neither jumps the lr nor stretches what already ran.
    """
    total = max(int(total_steps), 1)
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total)
    resume = resume if resume is not None else {}

    def fn(step: int) -> float:
        if resume and step >= resume["step"]:
            progress = min((step - resume["step"]) / max(total - resume["step"], 1), 1.0)
            return spec.min_lr_ratio + (resume["mult"] - spec.min_lr_ratio) * _decay(spec, progress)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * _decay(spec, progress)

    return fn


SCHEDULE_KEY = "lit_ft_schedule"  # checkpoint entry: the schedule's length, so a resume can tell it changed


def configure(module, spec: OptimSpec, total_steps: int) -> dict:
    """What a LightningModule's `configure_optimizers` returns: the optimizer and a per-step schedule.

    The schedule's length and a (so far empty) resume record are kept on the module: the checkpoint records the
    length, and `apply_on_resume` uses both after a restore."""
    opt = make_optimizer(module.named_parameters(), spec)
    module._lit_ft_schedule = {"total": int(total_steps), "resume": {}}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, total_steps, module._lit_ft_schedule["resume"]))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def apply_on_resume(module, optimizer, scheduler, spec: OptimSpec, saved_spec: OptimSpec, saved_total: int | None,
                    log) -> None:
    """After a restore: give the restored optimizer and schedule this run's settings (the documented resume rule).

    Lightning restores the optimizer's param groups and the schedule's `base_lrs` from the checkpoint, which would
    silently keep the old lr, betas, eps and weight decay. Here each changed one is set to the new value and logged.
    When the run's length changed, the schedule continues from where it was (see `lr_lambda`).
    """
    state = getattr(module, "_lit_ft_schedule", None)
    step = scheduler.last_epoch if scheduler is not None else 0
    if state is not None and saved_total is not None and saved_total != state["total"]:
        if step >= state["total"]:
            log(f"the run's length changed ({saved_total} -> {state['total']} optimizer steps) but {step} steps are "
                "already done: nothing left to train")
        else:
            mult = lr_lambda(saved_spec, saved_total)(step)
            if mult <= 0.0:
                raise ConfigError(
                    f"trainer.max_steps: the run's length changed ({saved_total} -> {state['total']} optimizer steps) "
                    f"but its lr schedule had already reached 0 at step {step}: every added step would run at lr 0 and "
                    "train nothing. Start a new run from the exported adapter (model.base.adapter), or keep a floor "
                    "above 0 (model.optim.min_lr_ratio) in runs you mean to extend")
            warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * state["total"])
            if step >= warmup:
                state["resume"].update(step=step, mult=mult)
            log(f"the run's length changed ({saved_total} -> {state['total']} optimizer steps): the lr schedule "
                f"continues from step {step} at {mult:.4g} x lr and reaches its floor at step {state['total']}")
    changed = [k for k in ("lr", "betas", "eps", "weight_decay")
               if _plain(getattr(spec, k)) != _plain(getattr(saved_spec, k))]
    for k in changed:
        log(f"model.optim.{k} changed since the checkpoint ({_plain(getattr(saved_spec, k))} -> "
            f"{_plain(getattr(spec, k))}): the new value applies from this step on")
    for k in ("scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio"):
        if getattr(spec, k) != getattr(saved_spec, k):
            log(f"model.optim.{k} changed since the checkpoint ({getattr(saved_spec, k)} -> {getattr(spec, k)}): "
                f"the lr follows the new schedule from step {step} on")
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(spec.betas), spec.eps
        group["weight_decay"] = spec.weight_decay if _decays(group) else 0.0  # as `_param_groups` splits them
        group["initial_lr"] = spec.lr * group.get("lr_scale", 1.0)
    if scheduler is not None:
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * fn(step)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _decays(group: dict) -> bool:
    return any(p.ndim >= 2 for p in group["params"])


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v
