"""Guards against numerical faults and out-of-memory errors: skip non-finite steps, explain OOMs.

`NonFiniteGuard` is used by a LightningModule's `optimizer_step` / `lr_scheduler_step` overrides (automatic
optimization). It runs Lightning's closure (training_step + backward) itself, then checks the loss and every
gradient. A non-finite one means the step is skipped: `optimizer.step` is not called (weights and optimizer state
stay as they were), the gradients are zeroed, the skip is counted (`train/skipped_steps`), and the learning-rate
scheduler does not advance for it. After `max_consecutive_skips` skips in a row the run stops with
`NonFiniteError`; the skipped steps never changed the weights, so the last checkpoint is still good.

Precision: with `32-true` and `bf16-mixed` there is no loss scaler and the guard checks loss and gradients.
With `16-mixed` Lightning's `MixedPrecisionPlugin` owns a `GradScaler` whose job is to skip steps with inf/NaN
(scaled) gradients and lower the scale; the guard then checks only the loss, so it never fights the scaler
(scaler skips are not counted here, and Lightning steps the scheduler for them as it always does).
On CPU Lightning replaces `16-mixed` with `bf16-mixed` (fp16 AMP is CUDA-only), so there the full check runs.
Lightning counts a skipped step in `trainer.global_step` (it is an attempted optimizer step), so `max_steps`
bounds attempts, not successful updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.train import integrity
from lit_ft.errors import ConfigError, LitFTError

log = logging.getLogger(__name__)


class NonFiniteError(LitFTError, FloatingPointError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


def grads_finite(optimizer) -> torch.Tensor | None:
    """A 0-d bool tensor: every gradient of the optimizer's parameters is finite (None without gradients; no sync)."""
    return integrity.all_finite(p.grad for group in optimizer.param_groups for p in group["params"]
                                if p.grad is not None)


GUARD_KEY = "lit_ft_guard"  # checkpoint key of the skip counters


def newest_good_checkpoint(trainer) -> str:
    """The newest checkpoint of the run's checkpoint directories that verifies (finite weights included)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            good = integrity.newest_verified(cb.dirpath)
            if good is not None:
                return str(good)
    return "none (no checkpoint was written yet)"


def check_weights_finite(module: L.LightningModule, optimizer) -> None:
    """Stop the run when an optimizer step made a trainable weight NaN/inf, before anything can be saved.

    The gradient check cannot see this: the update itself can be non-finite with finite gradients (an lr that
    overflows the weights' dtype; Adam with `eps 0` on a gradient that is exactly 0, which the settings table now
    refuses). One device sync per step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if integrity.trainable_finite(params):
        return
    trainer = module.trainer
    raise NonFiniteError(
        f"optimizer step {trainer.global_step} made trainable weights NaN/inf (the update itself, with finite "
        "gradients: lower model.optim.lr); stopped before anything was saved. The "
        f"newest checkpoint with finite weights: {newest_good_checkpoint(trainer)}"
    )


class CountWeighting:
    """The loss of an optimizer step as the sum over every item (loss token, preference pair) of every micro-batch
    on every rank, divided by their total count, as transformers does since 4.46.

    Dividing each micro-batch by its own count (the mean per micro-batch) makes a token of a short micro-batch
    weigh more than one of a long micro-batch under gradient accumulation and DDP. Here each micro-batch's loss
    is its *sum* divided by a constant `unit` (the first micro-batches' mean count over the ranks, kept in the checkpoint, so the
    values stay of the usual size), and before the optimizer step the accumulated gradients are multiplied by
    `accumulate_grad_batches * world_size * unit / total count` (the total summed over the ranks: one
    all-reduce per step), which undoes Lightning's division by the accumulation steps and DDP's mean over ranks.
    Under DeepSpeed, which owns the gradients, each micro-batch keeps its own mean.
    """

    def __init__(self):
        self.unit: float | None = None
        self.window: torch.Tensor | None = None

    def loss(self, module: L.LightningModule, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        if _is_deepspeed(module):
            return loss_sum / count.clamp(min=1)
        return loss_sum / self.add(module, count)

    def add(self, module: L.LightningModule, count: torch.Tensor) -> float:
        """Count one micro-batch's items into the step; the `unit` its loss sum is divided by (fixed by the first
        micro-batch of the run)."""
        count = count.detach().float()
        self.window = count if self.window is None else self.window + count
        if self.unit is None:  # the same on every rank (the gradients are averaged over them): one collective, once
            trainer = getattr(module, "_trainer", None)
            total, world = (trainer.strategy.reduce(count.clone(), reduce_op="sum"), trainer.world_size) if trainer \
                else (count, 1)
            self.unit = max(float(total) / world, 1.0)
        return self.unit

    def rescale(self, module: L.LightningModule, optimizer) -> None:
        """Turn the accumulated gradients into those of the count-weighted mean (before clipping and the step)."""
        if self.window is None or self.unit is None:
            return
        trainer = module.trainer
        total = trainer.strategy.reduce(self.window.clone(), reduce_op="sum")
        self.window = None
        factor = trainer.accumulate_grad_batches * trainer.world_size * self.unit / total.clamp(min=1)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))

    def state_dict(self) -> dict:
        return {"unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        self.unit = state.get("unit")


def _is_deepspeed(module) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and type(trainer.strategy).__name__.startswith("DeepSpeed")


class NonFiniteGuard:
    """Skip-and-count state of one module; see the module docstring."""

    def __init__(self, max_consecutive_skips: int = 10):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self.stepped = 0  # optimizer steps taken by this process (not saved: a resumed run counts its own)
        self.last_skipped = False
        self.weighting = CountWeighting()

    def optimizer_step(self, module: L.LightningModule, optimizer, closure: Callable | None) -> bool:
        """Run ``closure``, then step ``optimizer`` unless the loss or a gradient is not finite; True if stepped."""
        if closure is None:  # nothing to guard: Lightning's own behaviour
            optimizer.step()
            return True
        loss = closure()  # training_step + backward (+ the precision plugin's scaling)
        if loss is None:  # training_step returned None: backward was skipped; let the optimizer no-op as usual
            optimizer.step(closure=lambda: loss)
            self.last_skipped = False
            return True
        self.weighting.rescale(module, optimizer)
        finite = torch.isfinite(loss.detach()).all()
        if getattr(module.trainer.precision_plugin, "scaler", None) is None:
            grads = grads_finite(optimizer)
            finite = finite if grads is None else finite & grads.to(finite.device)
        finite = bool(finite)  # the step's one device sync for the decision (loss and gradients together)
        # Every rank must take the same decision (DDP grads are already all-reduced; a loss is per rank).
        finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self.last_skipped = not finite
        if finite:
            self.consecutive = 0
            self.stepped += 1
            # The closure already ran: hand its result to the optimizer (and the precision plugin's clipping
            # and on_before_optimizer_step hook) without running forward/backward again.
            optimizer.step(closure=lambda: loss)
            check_weights_finite(module, optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive += 1
            rank_zero_warn(
                f"step {module.trainer.global_step}: non-finite loss or gradient (loss={float(loss.detach()):.4g}); "
                f"optimizer step skipped ({self.consecutive} in a row, {self.skipped} in total)"
            )
        module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive} optimizer steps in a row had a non-finite (NaN/inf) loss or gradient, up to "
                f"global step {module.trainer.global_step}; stopping. The skipped steps did not change the weights, "
                "so the last checkpoint is still good. Lower model.optim.lr, set trainer.gradient_clip_val, use "
                "trainer.precision 32-true or bf16-mixed instead of 16-mixed, check the data, or raise "
                "model.max_consecutive_skips"
            )
        return finite

    def state_dict(self) -> dict:
        """The skip counters, saved with the checkpoint so a resumed run keeps counting where it stopped."""
        return {"skipped": self.skipped, "consecutive": self.consecutive, "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.weighting.load_state_dict(state.get("weighting") or {})

    def lr_scheduler_step(self, module: L.LightningModule, scheduler, metric) -> None:
        """Advance the scheduler unless the optimizer step just skipped."""
        if self.last_skipped:
            return
        L.LightningModule.lr_scheduler_step(module, scheduler, metric)


# The hooks of a module that keeps a `NonFiniteGuard` as `self.guard`, bound as its methods
# (`optimizer_step = guards.optimizer_step`): every stage with automatic optimization guards its steps one way.


def optimizer_step(module: L.LightningModule, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
    """`LightningModule.optimizer_step`: skip (and count) a step whose loss or gradients are not finite, instead of
    writing NaN into the adapter."""
    module.guard.optimizer_step(module, optimizer, optimizer_closure)


def lr_scheduler_step(module: L.LightningModule, scheduler, metric) -> None:
    """`LightningModule.lr_scheduler_step`: a skipped step does not advance the schedule."""
    module.guard.lr_scheduler_step(module, scheduler, metric)


def restore(module: L.LightningModule, checkpoint: dict) -> None:
    """The skip counters saved with the checkpoint (under `GUARD_KEY`), for `on_load_checkpoint`."""
    if GUARD_KEY in checkpoint:
        module.guard.load_state_dict(checkpoint[GUARD_KEY])


# ---------------------------------------------------------------------------------------------- out of memory

MEMORY_SETTINGS = (
    "data.batch_size (the micro-batch; keep the effective batch with trainer.accumulate_grad_batches)",
    "data.max_length (longest row in tokens)",
    "model.base.gradient_checkpointing: true (recompute activations in backward)",
    "model.base.quantization: nf4 (or int8): a 4-bit/8-bit frozen base (QLoRA)",
    "trainer.accumulate_grad_batches (raise it as you lower data.batch_size)",
)


def is_oom(exception: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS, XPU), or a RuntimeError carrying an allocator's out-of-memory message."""
    if isinstance(exception, torch.OutOfMemoryError):
        return True
    text = str(exception)
    return isinstance(exception, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def oom_advice(exception: BaseException) -> str:
    first = str(exception).strip().splitlines()[0][:200] if str(exception).strip() else type(exception).__name__
    lines = "\n".join(f"  - {s}" for s in MEMORY_SETTINGS)
    return f"out of memory ({first}). Settings that reduce memory, roughly by effect:\n{lines}"


class OOMAdvice(L.Callback):
    """On an out-of-memory error anywhere in fit/validate, say which settings reduce memory.

    Lightning calls ``on_exception`` and then re-raises the original error after its teardown. Raising a new
    error here would skip that teardown, so the advice is logged and attached to the original error as a note
    (``BaseException.add_note``): it is printed right under the OOM traceback.
    """

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not is_oom(exception):
            return
        message = oom_advice(exception)
        log.error(message)
        if message not in getattr(exception, "__notes__", ()):
            exception.add_note(message)


class TrainsSomething(L.Callback):
    """A fit that cannot train, or did not, is an error, never an exit 0 with an untrained adapter: zero steps or
    epochs are refused before any model is built, and a run whose every optimizer step was skipped (each loss or
    gradient non-finite, fewer than `max_consecutive_skips` of them) fails at its end."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: must be at least 1")
        for key in ("max_steps", "max_epochs"):
            if getattr(trainer, key, None) == 0 and not trainer.fast_dev_run:
                raise ConfigError(f"trainer.{key}=0: the run would train nothing; give it at least one step "
                                 "(lit-ft validate measures a model without training it)")

    def on_train_end(self, trainer, pl_module) -> None:
        check_trained(pl_module)


def check_trained(module) -> None:
    """Raise when every optimizer step this process ran was skipped (called before any export, too)."""
    guard = getattr(module, "guard", None)
    if isinstance(guard, NonFiniteGuard) and guard.stepped == 0 and guard.skipped > 0:
        raise NonFiniteError(
            f"every optimizer step of this run was skipped ({guard.skipped}: non-finite loss or gradient), so nothing "
            "was trained and no adapter is exported. Lower model.optim.lr, check the loss settings (a margin or beta "
            "that overflows) and the data")
