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

from lit_ft.errors import LitFTError

log = logging.getLogger(__name__)


class NonFiniteError(LitFTError, FloatingPointError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


def grads_finite(optimizer) -> bool:
    """True when every gradient of the optimizer's parameters is finite (one device sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


GUARD_KEY = "lit_ft_guard"  # checkpoint key of the skip counters


class NonFiniteGuard:
    """Skip-and-count state of one module; see the module docstring."""

    def __init__(self, max_consecutive_skips: int = 10):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self.last_skipped = False

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
        finite = bool(torch.isfinite(loss.detach()).all())
        if finite and getattr(module.trainer.precision_plugin, "scaler", None) is None:
            finite = grads_finite(optimizer)
        # Every rank must take the same decision (DDP grads are already all-reduced; a loss is per rank).
        finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self.last_skipped = not finite
        if finite:
            self.consecutive = 0
            # The closure already ran: hand its result to the optimizer (and the precision plugin's clipping
            # and on_before_optimizer_step hook) without running forward/backward again.
            optimizer.step(closure=lambda: loss)
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
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def lr_scheduler_step(self, module: L.LightningModule, scheduler, metric) -> None:
        """Advance the scheduler unless the optimizer step just skipped."""
        if self.last_skipped:
            return
        L.LightningModule.lr_scheduler_step(module, scheduler, metric)


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
