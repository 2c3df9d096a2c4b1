"""Callbacks: throughput, sample generations with a task metric, adapter export, an offline-first W&B logger."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_ft import strategies
from lit_ft.integrity import load_verified
from lit_ft.runs import atomic_directory
from lit_ft.generation import SamplingSpec, generate
from lit_ft.models import eval_mode


def resolve_callable(path: str):
    """Import `package.module.function` (used for metrics and rewards named in a config)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"'{path}' is not a dotted path like package.module.function")
    return getattr(importlib.import_module(module), name)


@rank_zero_only
def log_table(trainer, key: str, columns: list[str], rows: list[list]) -> None:
    """A W&B table of samples, when a W&B logger is attached (rank zero only)."""
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            logger.log_table(key, columns=columns, data=rows, step=trainer.global_step)


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger, offline unless credentials are set (runs sync later with `wandb sync DIR`)."""

    def __init__(self, project: str = "lit_ft", name: str | None = None, save_dir: str = "runs",
                 offline: bool | None = None, log_model: bool = False):
        """
        Args:
            project: W&B project.
            name: run name.
            save_dir: where the run files go.
            offline: None = offline unless WANDB_API_KEY is set or `wandb login` stored a key.
            log_model: upload checkpoints as W&B artifacts.
        """
        if offline is None:
            offline = not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb())
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model)


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class PrintMetrics(L.Callback):
    """Logged metrics as plain lines of text, for log files (SLURM, nohup, CI) where progress bars do not show.

    One line after each validation with every `val/` metric (the sanity check's too, labelled as such: with
    `num_sanity_val_steps` covering the validation batches it is the before-training figure), and one every
    `every_n_steps` training batches with the training metrics (`train/`, `objective/`, `ppo/` ...); 0 prints
    validation lines only.
    """

    def __init__(self, every_n_steps: int = 0, train_prefixes: tuple[str, ...] = ("train/", "objective/", "ppo/")):
        self.every_n_steps, self.train_prefixes = every_n_steps, tuple(train_prefixes)

    @staticmethod
    def _line(trainer, what: str, keep) -> None:
        values = {k: v for k, v in trainer.callback_metrics.items() if keep(k) and v.numel() == 1}
        if values:
            text = "  ".join(f"{k} {float(v):.4g}" for k, v in sorted(values.items()))
            rank_zero_info(f"[{what} step {trainer.global_step}] {text}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and (batch_idx + 1) % self.every_n_steps == 0:
            self._line(trainer, "train", lambda k: k.startswith(self.train_prefixes))

    def on_validation_end(self, trainer, pl_module) -> None:
        sanity = f" (sanity check, {trainer.num_sanity_val_steps} batches)" if trainer.sanity_checking else ""
        self._line(trainer, f"validation{sanity}", lambda k: k.startswith("val/"))


class ThroughputLogger(L.Callback):
    """Logs `perf/tokens_per_sec`: non-pad tokens of the training batches over wall time."""

    def __init__(self, window: int = 10):
        self.window = window
        self._times: list[tuple[float, int]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self._times = (self._times + [(time.perf_counter() - self._start, tokens)])[-self.window :]
        seconds = sum(t for t, _ in self._times)
        pl_module.log("perf/tokens_per_sec", sum(n for _, n in self._times) / max(seconds, 1e-9), prog_bar=True)


class SampleGenerations(L.Callback):
    """Generates answers for held-out prompts, scores them with a task metric, and shows them.

    Before training and after it the examples and the metric are printed; at each validation the metric is
    logged as `val/<metric_name>` and, with W&B, a table of prompts, generations and references.
    The datamodule provides `held_out_prompts(n) -> [(prompt_text, reference)]` with the prompt already
    rendered in its template, and `tokenizer`.
    """

    def __init__(self, num_prompts: int = 64, batch_size: int = 32, max_new_tokens: int = 32, print_examples: int = 3,
                 metric: str = "lit_ft.tasks.answer_match", metric_name: str = "exact_match"):
        """
        Args:
            num_prompts: held-out prompts evaluated each time.
            batch_size: prompts generated at once.
            max_new_tokens: longest generation (greedy).
            print_examples: generations printed before and after training.
            metric: dotted path of `fn(generation, reference) -> bool | float`.
            metric_name: the logged name, `val/<metric_name>`.
        """
        self.num_prompts, self.batch_size, self.print_examples = num_prompts, batch_size, print_examples
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=False)
        self.metric, self.metric_name = resolve_callable(metric), metric_name
        self.before: float | None = None

    def evaluate(self, trainer, pl_module) -> tuple[float, list[tuple[str, str, str]]]:
        dm = trainer.datamodule
        tok = dm.tokenizer
        rows = dm.held_out_prompts(self.num_prompts)
        model = pl_module.model
        results = []
        with eval_mode(model), torch.no_grad(), strategies.for_generation(trainer):
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i : i + self.batch_size]
                enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(pl_module.device)
                out, _ = generate(model, enc["input_ids"], enc["attention_mask"], self.sampling,
                                  tok.eos_token_id, tok.pad_token_id)
                texts = tok.batch_decode(out, skip_special_tokens=True)
                results += [(p, g.strip(), ref) for (p, ref), g in zip(chunk, texts)]
        score = sum(float(self.metric(g, ref)) for _, g, ref in results) / max(len(results), 1)
        return score, results

    def _print(self, when: str, score: float, results) -> None:
        rank_zero_info(f"\n[{when}] {self.metric_name} on {len(results)} held-out prompts: {score:.3f}")
        for p, g, ref in results[: self.print_examples]:
            rank_zero_info(f"  prompt: {p[-80:]!r}\n  output: {g!r}\n  reference: {ref!r}")

    def on_train_start(self, trainer, pl_module):
        self.before, results = self.evaluate(trainer, pl_module)
        self._print("before training", self.before, results)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        score, results = self.evaluate(trainer, pl_module)
        self._last = (trainer.global_step, score, results)
        pl_module.log(f"val/{self.metric_name}", score)
        self._log_table(trainer, results)

    def on_train_end(self, trainer, pl_module):
        step, score, results = getattr(self, "_last", (None, None, None))
        if step != trainer.global_step:  # no validation ran on the final weights: evaluate them now
            score, results = self.evaluate(trainer, pl_module)
        self._print("after training", score, results)
        if self.before is not None:
            rank_zero_info(f"{self.metric_name}: {self.before:.3f} -> {score:.3f}")
        self.after = score

    def _log_table(self, trainer, results) -> None:
        log_table(trainer, "val/samples", ["prompt", "generation", "reference"], [list(r) for r in results])


class ExportAdapter(L.Callback):
    """At the end of fit, writes the trained adapter (PEFT format, with tokenizer files) to `dirpath`.

    With `best=True` and a ModelCheckpoint monitoring a metric, the best checkpoint's weights are exported.
    The directory is written atomically (`runs.atomic_directory`): a kill during the export leaves the previous
    export or none, never a partial one. A fit that finds its run already finished (resumed from its last
    checkpoint) writes the adapter when the directory is missing.
    """

    def __init__(self, dirpath: str = "runs/adapter", best: bool = False):
        """
        Args:
            dirpath: output directory (adapter_model.safetensors, adapter_config.json, tokenizer files).
            best: export the best checkpoint of the run's ModelCheckpoint instead of the last weights.
        """
        self.dirpath, self.best = dirpath, best
        self._written = False

    def on_fit_start(self, trainer, pl_module):
        self._written = False

    def on_train_end(self, trainer, pl_module):
        self.export(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        # Lightning skips the training loop, and with it on_train_end, when a resumed run has nothing left to do.
        if not self._written and not (Path(self.dirpath) / "adapter_config.json").exists():
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module):
        if self.best and trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            best = trainer.checkpoint_callback.best_model_path
            state = load_verified(best)
            unmatched = pl_module.load_state_dict(state["state_dict"], strict=False).unexpected_keys
            if unmatched:  # e.g. under FSDP, whose wrapped parameter names differ: never export the last weights silently
                raise RuntimeError(f"ExportAdapter(best=True): {len(unmatched)} tensors of {best} match no parameter "
                                   f"of the module (first: {unmatched[0]}); use best=False, or export that checkpoint "
                                   "with `python -m lit_ft.export`")
        state = strategies.gathered_model_state(trainer)  # collective under FSDP: every rank takes part
        if trainer.is_global_zero:
            dm = trainer.datamodule
            kwargs = {"state_dict": state} if state is not None else {}
            with atomic_directory(self.dirpath) as tmp:
                pl_module.save_adapter(tmp, tokenizer=getattr(dm, "tokenizer", None), **kwargs)
            rank_zero_info(f"adapter written to {self.dirpath}")
        self._written = True
        trainer.strategy.barrier()
