"""Progress as plain lines of text, for log files (SLURM, nohup, CI) where progress bars do not show."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar  # RichProgressBar needs rich when built
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks.logging import token_count


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
    training metrics (`train/`, `objective/`, `ppo/`; the online stages' sampler/trainer mismatch `rollout/` and
    phase times `time/`) followed by progress: steps done of the total, learning
    rate, tokens per second (non-pad tokens of the batches, since the start), elapsed time and ETA; one line after
    each validation with every `val/` metric (the sanity check's too, labelled as such: with `num_sanity_val_steps`
    covering the validation batches it is the before-training figure); and a final line with the peak memory.
    `every_n_steps` 0 prints validation lines only.
    """

    def __init__(self, every_n_steps: int = 0,
                 train_prefixes: tuple[str, ...] = ("train/", "objective/", "ppo/", "rollout/", "time/")):
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
        tokens = int(self._tokens)  # (a device tensor: read here, where the line is printed)
        if tokens:
            parts.append(f"tokens/s {tokens / max(elapsed, 1e-9):.0f}")
        parts.append(f"elapsed {clock(elapsed)}")
        rate = (done - self._done0) / max(elapsed, 1e-9)
        if rate > 0 and total != float("inf"):
            parts.append(f"eta {clock((total - done) / rate)}")
        return "  ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += token_count(batch)  # packed batches: their sequences, not the padding tail; no GPU wait
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


# ------------------------------------------------------------------------------------------------ the TTY bar


def step_bounded(trainer) -> bool:
    """Whether the run's length is counted in steps (`max_steps`, with `max_epochs` -1/None, as in the recipes):
    then a bar per epoch says little ("Epoch 0/-2", the epoch's ETA), and one bar over the whole run is shown."""
    return trainer.max_epochs in (None, -1) and trainer.max_steps not in (None, -1)


def _train_description(trainer) -> str:
    epochs = trainer.max_epochs
    if epochs in (None, -1):
        return f"Step (epoch {trainer.current_epoch})" if step_bounded(trainer) else f"Epoch {trainer.current_epoch}"
    return f"Epoch {trainer.current_epoch}/{epochs - 1}"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar; in a run bounded by `max_steps` the training bar spans the whole run: steps
    done of the total (optimizer steps; batches under manual optimization, as `PrintMetrics`), elapsed and ETA,
    across epochs. Runs bounded by epochs keep Lightning's bar per epoch, with no "Epoch N/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = _train_description(self.trainer)
        return f"{text:{len(self.validation_description)}}"  # as Lightning pads it, against flicker

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not step_bounded(trainer) or self.is_disabled:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.progress is None or self._progress_stopped:
            self._init_progress(trainer)
        done, total = PrintMetrics._progress_unit(trainer, pl_module)
        description = self._get_train_description(trainer.current_epoch)
        if self.train_progress_bar_id is None:  # once a run: the completed steps (a resume's) count no speed
            description = f"[{self.theme.description}]{description}" if self.theme.description else description
            self.train_progress_bar_id = self.progress.add_task(description, total=total, completed=done)
        else:
            self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not step_bounded(trainer) or self.is_disabled:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar_id is None:  # resumed mid-epoch: no epoch start was seen
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, PrintMetrics._progress_unit(trainer, pl_module)[0])
        self._update_metrics(trainer, pl_module)
        self.refresh()


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the same rule as `StepRichProgressBar` (used where rich is not installed)."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not step_bounded(trainer):
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(_train_description(trainer))
            return
        bar, pl_module = self.train_progress_bar, trainer.lightning_module
        done, total = PrintMetrics._progress_unit(trainer, pl_module)
        if bar.total != total:  # once a run: tqdm's rate counts from `initial`, so a resume's ETA is right
            bar.reset(total=total)
            bar.initial = bar.n = done
        bar.set_description(_train_description(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not step_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        done, _ = PrintMetrics._progress_unit(trainer, pl_module)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(done, bar.total):
            bar.n = done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def step_progress_bar():
    """The bar `lit-ft` adds when the config names none: rich where it is installed (Lightning's own choice)."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
