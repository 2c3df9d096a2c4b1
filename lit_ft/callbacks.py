"""Callbacks: throughput, sample generations with a task metric, adapter export, an offline-first W&B logger."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLRMonitor
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_ft import strategies
from lit_ft.errors import ConfigError
from lit_ft.integrity import load_verified
from lit_ft.runs import atomic_directory
from lit_ft.generation import SamplingSpec, generate
from lit_ft.models import eval_mode
from lit_ft.progress import PrintMetrics  # noqa: F401 (configs name lit_ft.callbacks.PrintMetrics)


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
    """Lightning's W&B logger, offline unless W&B is set up (runs sync later with `wandb sync DIR`).

    `WANDB_MODE` (offline, online, disabled) is obeyed as W&B obeys it; without it the run is online when W&B has
    credentials for its host (`WANDB_API_KEY`, or a `~/.netrc` entry for `WANDB_BASE_URL` / the host `wandb login
    --host` stored, api.wandb.ai by default) and offline otherwise.
    """

    def __init__(self, project: str = "lit_ft", name: str | None = None, save_dir: str = ".",
                 offline: bool | None = None, log_model: bool | str = False, log_adapter: bool = False):
        """
        Args:
            project: W&B project.
            name: run name.
            save_dir: where the run files go (under `lit-ft`, relative to the run's directory).
            offline: None = as `WANDB_MODE` says, else offline unless W&B has credentials for its host.
            log_model: upload checkpoints as W&B artifacts (True: at the end, "all": as they are written); needs
                an online run, so it is turned off, with a warning, when the run is offline.
            log_adapter: log the adapter that `ExportAdapter` writes at the end of fit as a W&B artifact of type
                `model` (name `adapter-<run id>`, aliases `latest` and `step-N`, the run's metadata: stage, base,
                LoRA settings, step, final metrics). Online it uploads; offline it is stored in the run's files
                and `wandb sync` uploads it; with `WANDB_MODE=disabled` nothing is logged (one line says so).
        """
        if offline is None:
            offline = wandb_offline()
        if offline and log_model:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("WandbLogger(log_model=...): the run is offline, so no checkpoint is uploaded")
            log_model = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model)
        self.log_adapter = log_adapter

    @rank_zero_only
    def log_adapter_artifact(self, path: str | Path, metadata: dict, step: int) -> str:
        """Log the adapter directory `path` as a `model` artifact of this run; returns the line it printed.

        W&B copies the files into its staging folder, so an offline run uploads them at `wandb sync` even if the
        directory has been replaced by then. A failing W&B call is reported in one line, never raised: the
        training is done and the adapter is on disk either way."""
        import wandb

        run = self.experiment
        if getattr(run, "disabled", False) or os.environ.get("WANDB_MODE") == "disabled":
            return _say(f"W&B is disabled (WANDB_MODE=disabled): adapter {path} not logged as an artifact")
        name = f"adapter-{run.id}"
        try:
            artifact = wandb.Artifact(name, type="model", metadata=metadata,
                                      description=f"LoRA adapter of {metadata.get('base')} ({metadata.get('stage')}, "
                                                  f"step {step})")
            artifact.add_dir(str(path))
            run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        except (wandb.Error, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return _say(f"WandbLogger(log_adapter=True): adapter {path} not logged as an artifact: {first[:200]}")
        if run.offline:
            return _say(f"W&B run is offline: adapter artifact {name} (type model) is stored in the run's files; "
                        f"`wandb sync {Path(run.dir).parent}` uploads it")
        return _say(f"adapter logged to W&B as artifact {name}:latest (type model)")


def _say(line: str) -> str:
    rank_zero_info(line)
    return line


def adapter_metadata(trainer, pl_module, path: str | Path) -> dict:
    """What an adapter artifact records: the stage, the base as the export names it, the LoRA settings of
    `adapter_config.json`, the step and epoch, the run directory and the final scalar metrics."""
    import json
    from importlib.metadata import PackageNotFoundError, version

    try:
        lit_ft_version = version("lit_ft")
    except PackageNotFoundError:  # a checkout on PYTHONPATH
        lit_ft_version = None
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if isinstance(v, torch.Tensor) and v.numel() == 1}
    return {
        "stage": type(pl_module).__name__,
        "base": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "lora": {k: config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                             "use_dora")},
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "run_dir": str(Path(trainer.default_root_dir).resolve()),
        "metrics": metrics,
        "lit_ft_version": lit_ft_version,
    }


def log_adapter_artifacts(trainer, pl_module, path: str | Path) -> list[str]:
    """Log `path` with every lit_ft WandbLogger of the trainer that has `log_adapter=True` (rank zero)."""
    wanted = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.log_adapter]
    if not wanted or not trainer.is_global_zero:
        return []
    try:
        metadata = adapter_metadata(trainer, pl_module, path)
    except (OSError, ValueError) as e:  # no crash after a finished training: the adapter is on disk
        return [_say(f"WandbLogger(log_adapter=True): adapter {path} not logged as an artifact: {e}")]
    return [lg.log_adapter_artifact(path, metadata, trainer.global_step) for lg in wanted]


def wandb_offline() -> bool:
    """Offline unless `WANDB_MODE` says otherwise or W&B has credentials for its host."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    return not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb())


def _wandb_host() -> str:
    """The W&B host: `WANDB_BASE_URL`, else the `base_url` `wandb login --host` saved, else api.wandb.ai."""
    import configparser
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        folder = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
        settings = configparser.ConfigParser()
        try:
            settings.read(folder / "settings")
            url = settings.get("default", "base_url", fallback=None)
        except configparser.Error:
            url = None
    return urlparse(url).hostname if url else "api.wandb.ai"


def _netrc_has_wandb() -> bool:
    import netrc

    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.exists():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(_wandb_host()) is not None
    except (netrc.NetrcParseError, OSError):
        return False


class LearningRateMonitor(_LightningLRMonitor):
    """Lightning's LearningRateMonitor, doing nothing (instead of failing) when the run has no logger, so recipes
    keep working with `--trainer.logger false`."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._off = not trainer.loggers
        if not self._off:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_off", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_off", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


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


@torch.no_grad()
def score_prompts(model, tok, rows: list[tuple[str, str]], sampling: SamplingSpec, metric, batch_size: int,
                  device) -> list[tuple[str, str, str, float]]:
    """(prompt, generation, reference, metric(generation, reference)) for each rendered (prompt, reference) row,
    generated `batch_size` prompts at a time (left-padded, no special tokens added: the rendering has them)."""
    results = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False).to(device)
        out, _ = generate(model, enc["input_ids"], enc["attention_mask"], sampling, tok.eos_token_id, tok.pad_token_id)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        results += [(p, g.strip(), ref, float(metric(g.strip(), ref))) for (p, ref), g in zip(chunk, texts)]
    return results


def _free_memory(model) -> int | None:
    """Free bytes where the model's weights live: the CUDA device's, else the host's (free pages, the page cache not
    counted)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class SampleGenerations(L.Callback):
    """Generates answers for held-out prompts, scores them with a task metric, and shows them.

    Before training and after it the examples and the metric are printed; at each validation the metric is
    logged as `val/<metric_name>` and, with W&B, a table of prompts, generations and references. The final line
    compares after with before prompt by prompt (`paired_change`): how many prompts got better and worse, and the
    standard error of the mean change, which is what tells a gain from the noise of the evaluation set.
    The datamodule provides `held_out_prompts(n) -> [(prompt_text, reference)]` with the prompt already
    rendered in its template, and `tokenizer`.
    """

    def __init__(self, num_prompts: int = 64, batch_size: int = 32, max_new_tokens: int = 32, print_examples: int = 3,
                 metric: str = "lit_ft.tasks.answer_match", metric_name: str = "exact_match", merged: bool = False):
        """
        Args:
            num_prompts: held-out prompts evaluated each time.
            batch_size: prompts generated at once.
            max_new_tokens: longest generation (greedy).
            print_examples: generations printed before and after training.
            metric: dotted path of `fn(generation, reference) -> bool | float`.
            metric_name: the logged name, `val/<metric_name>`.
            merged: decode with the active LoRA adapter merged into a temporary copy of the wrapped weights (as
                `sampling.merged` does for rollouts: faster decode steps for one copy of those weights; a
                quantized base is refused by name).
        """
        self.merged = merged
        self.num_prompts, self.batch_size, self.print_examples = num_prompts, batch_size, print_examples
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=False)
        self.metric, self.metric_name = resolve_callable(metric), metric_name
        self.before: float | None = None

    def evaluate(self, trainer, pl_module) -> tuple[float, list[tuple[str, str, str, float]]]:
        dm = trainer.datamodule
        tok = dm.tokenizer
        rows = dm.held_out_prompts(self.num_prompts)
        model = pl_module.model
        with eval_mode(model), torch.no_grad(), strategies.for_generation(trainer), self._merged(model):
            results = score_prompts(model, tok, rows, self.sampling, self.metric, self.batch_size, pl_module.device)
        score = sum(r[3] for r in results) / max(len(results), 1)
        return score, results

    def _merged(self, model):
        """The merged decode where it fits: the copy must take at most half the free memory of the device (so
        a recipe that merges for a small model does not run a large one out of memory at its evaluation)."""
        if not self.merged or not hasattr(model, "peft_config"):
            return contextlib.nullcontext()
        from lit_ft.rollout_ops import MergedWeights

        need, free = MergedWeights.bytes_needed(model, model.active_adapter), _free_memory(model)
        if free is not None and need > free / 2:
            if not getattr(self, "_told", False):
                rank_zero_info(f"SampleGenerations: merged decode skipped: its copy of the weights ({need / 2**30:.2f} "
                               f"GiB) is more than half the free memory ({free / 2**30:.2f} GiB)")
                self._told = True
            return contextlib.nullcontext()
        try:
            return MergedWeights(model, model.active_adapter).swapped_in()
        except ValueError as e:
            raise ConfigError(f"SampleGenerations(merged=True): {e}; set merged: false") from e

    def _print(self, when: str, score: float, results) -> None:
        rank_zero_info(f"\n[{when}] {self.metric_name} on {len(results)} held-out prompts: {score:.3f}")
        for p, g, ref, _ in results[: self.print_examples]:
            rank_zero_info(f"  prompt: {p[-80:]!r}\n  output: {g!r}\n  reference: {ref!r}")

    def on_train_start(self, trainer, pl_module):
        self.before, results = self.evaluate(trainer, pl_module)
        self._before_results = results
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
            line = f"{self.metric_name}: {self.before:.3f} -> {score:.3f}"
            before = getattr(self, "_before_results", None)
            if before is not None and [r[0] for r in before] == [r[0] for r in results]:  # the same prompts
                better, worse, mean, se = paired_change([r[3] for r in before], [r[3] for r in results])
                line += (f" (paired over {len(results)} prompts: {better} better, {worse} worse; change {mean:+.3f}, "
                         f"standard error {se:.3f})")
            rank_zero_info(line)
        self.after = score

    def _log_table(self, trainer, results) -> None:
        log_table(trainer, "val/samples", ["prompt", "generation", "reference", self.metric_name],
                  [list(r) for r in results])


def paired_change(before: list[float], after: list[float]) -> tuple[int, int, float, float]:
    """The change of a metric measured on the same examples twice: (examples that got better, that got worse, mean
    change, its standard error `std(after_i - before_i) / sqrt(n)`). Pairing removes the spread of difficulty
    between examples, so the error is much smaller than that of two independent proportions when few answers
    change."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return sum(x > 0 for x in d), sum(x < 0 for x in d), mean, math.sqrt(var / n) if n else 0.0


class ExportAdapter(L.Callback):
    """At the end of fit, writes the trained adapter (PEFT format, with tokenizer files) to `dirpath`.

    With `best=True` and a ModelCheckpoint monitoring a metric, the best checkpoint's weights are exported.
    The directory is written atomically (`runs.atomic_directory`): a kill during the export leaves the previous
    export or none, never a partial one. A fit that finds its run already finished (resumed from its last
    checkpoint) writes the adapter when the directory is missing.
    """

    def __init__(self, dirpath: str = "adapter", best: bool = False):
        """
        Args:
            dirpath: output directory (adapter_model.safetensors, adapter_config.json, tokenizer files, README.md);
                under `lit-ft`, a relative path is inside the run's directory.
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
            log_adapter_artifacts(trainer, pl_module, self.dirpath)
        self._written = True
        trainer.strategy.barrier()
