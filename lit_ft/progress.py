"""Progress as plain lines of text, for log files (SLURM, nohup, CI) where progress bars do not show."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


def clock(seconds: float) -> str:
    """`H:MM:SS`."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def device_summary(device: torch.device) -> str:
    """The device a run trains on, and on CUDA its name and free memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (f"{device} ({torch.cuda.get_device_name(device)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                "free)")
    return f"{device} ({torch.get_num_threads()} threads)"


def peak_memory(device: torch.device) -> str:
    """Peak memory of the run: allocated by torch on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = rss if sys.platform == "darwin" else rss * 1024
    return f"peak resident memory {rss / 2**30:.2f} GiB"


class PrintMetrics(L.Callback):
    """Logged metrics as plain lines of text.

    A start line (device, free CUDA memory, steps to run), one line every `every_n_steps` training batches with the
    training metrics (`train/`, `objective/`, `ppo/` ...) followed by progress: steps done of the total, learning
    rate, tokens per second (non-pad tokens of the batches, since the start), elapsed time and ETA; one line after
    each validation with every `val/` metric (the sanity check's too, labelled as such: with `num_sanity_val_steps`
    covering the validation batches it is the before-training figure); and a final line with the peak memory.
    `every_n_steps` 0 prints validation lines only.
    """

    def __init__(self, every_n_steps: int = 0, train_prefixes: tuple[str, ...] = ("train/", "objective/", "ppo/")):
        """
        Args:
            every_n_steps: print the training metrics every this many training batches; 0 = never.
            train_prefixes: metric name prefixes printed on training lines.
        """
        self.every_n_steps, self.train_prefixes = every_n_steps, tuple(train_prefixes)
        self._start = self._tokens = self._batches = 0

    @staticmethod
    def _metrics(trainer, keep) -> str:
        values = {k: v for k, v in trainer.callback_metrics.items() if keep(k) and v.numel() == 1}
        return "  ".join(f"{k} {float(v):.4g}" for k, v in sorted(values.items()))

    @staticmethod
    def _progress_unit(trainer, pl_module) -> tuple[int, float]:
        """(done, total) in the unit the run length is counted in: optimizer steps, or batches (rollouts) under
        manual optimization, where Lightning's step counter counts every optimizer call."""
        done = trainer.global_step if pl_module.automatic_optimization else trainer.fit_loop.total_batch_idx + 1
        return done, trainer.estimated_stepping_batches

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._tokens, self._batches = time.perf_counter(), 0, 0
        self._done0 = self._progress_unit(trainer, pl_module)[0]
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        _, total = self._progress_unit(trainer, pl_module)
        rank_zero_info(f"[start] device {device_summary(pl_module.device)}  precision {trainer.precision}  "
                       f"steps {total:g}  root {trainer.default_root_dir}")

    def progress(self, trainer, pl_module) -> str:
        done, total = self._progress_unit(trainer, pl_module)
        elapsed = time.perf_counter() - self._start
        parts = [f"{done}/{total:g}" if total != float("inf") else f"{done}"]
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        if self._tokens:
            parts.append(f"tokens/s {self._tokens / max(elapsed, 1e-9):.0f}")
        parts.append(f"elapsed {clock(elapsed)}")
        rate = (done - self._done0) / max(elapsed, 1e-9)
        if rate > 0 and total != float("inf"):
            parts.append(f"eta {clock((total - done) / rate)}")
        return "  ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._tokens += int(mask.sum()) if mask is not None else 0
        self._batches += 1
        if self.every_n_steps and (batch_idx + 1) % self.every_n_steps == 0:
            text = self._metrics(trainer, lambda k: k.startswith(self.train_prefixes))
            rank_zero_info(f"[train step {trainer.global_step}] {text}  | {self.progress(trainer, pl_module)}")

    def on_validation_end(self, trainer, pl_module) -> None:
        sanity = f" (sanity check, {trainer.num_sanity_val_steps} batches)" if trainer.sanity_checking else ""
        text = self._metrics(trainer, lambda k: k.startswith("val/"))
        if text:
            rank_zero_info(f"[validation{sanity} step {trainer.global_step}] {text}")

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._start
        rank_zero_info(f"[end] step {trainer.global_step} after {clock(elapsed)}  {peak_memory(pl_module.device)}")
