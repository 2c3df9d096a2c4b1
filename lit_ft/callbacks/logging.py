"""Logging callbacks: an offline-first W&B logger (with the adapter as an artifact), the learning-rate monitor that
works without a logger, and tokens per second."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLRMonitor
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only



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
        init = getattr(self, "_wandb_init", {})
        if init.get("anonymous", 0) is None:  # W&B warns about the setting even when it is unset
            init.pop("anonymous")
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


def token_count(batch):
    """Tokens of a batch that are not padding, as a 0-d tensor on the batch's device (read without waiting for the
    GPU: summed where the batch is), or an int: packed rows' sequences (`seq_lens`, or `sequence_ids` >= 0: their
    attention mask is all ones, the padding tail included; shared-prompt rows' `segment_ids` >= 0), else the
    attention mask's ones, else every id (0 for a batch that is not a dict of tensors)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return 0
    if batch.get("seq_lens") is not None:
        return batch["seq_lens"].sum()
    if batch.get("sequence_ids") is not None:
        return (batch["sequence_ids"] >= 0).sum()
    if batch.get("segment_ids") is not None:  # shared-prompt rows: the pairs' tokens, the padding tail not
        return (batch["segment_ids"] >= 0).sum()
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


class ThroughputLogger(L.Callback):
    """Logs `perf/tokens_per_sec`: non-pad tokens of the last `window` training batches over the wall time between
    their ends (data loading and the loop's own work between batches counted; validation not, nor the time before
    a fit's first batch). It adds no wait for the GPU of its own: the tokens are summed on the batch's device and
    the rate is logged as a tensor (Lightning reads it with the step's other progress-bar metrics)."""

    def __init__(self, window: int = 10):
        self.window = window
        self._times: list[tuple[float, object]] = []
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._times, self._last = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._last is None:
            self._last = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._last = None  # the next training batch starts the clock again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        start = now if self._last is None else self._last
        self._times = (self._times + [(now - start, token_count(batch))])[-self.window:]
        self._last = now
        seconds = sum(t for t, _ in self._times)
        tokens = sum(n for _, n in self._times)
        rate = tokens / max(seconds, 1e-9)
        pl_module.log("perf/tokens_per_sec", rate.float() if torch.is_tensor(rate) else float(rate), prog_bar=True)
