"""`ExportAdapter`: the trained adapter written at the end of fit (and every N steps if asked), atomically, and
logged as a W&B artifact."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks.logging import log_adapter_artifacts
from lit_ft.train import strategies
from lit_ft.train.guards import check_trained
from lit_ft.train.integrity import load_verified
from lit_ft.train.outputs import atomic_directory


class ExportAdapter(L.Callback):
    """At the end of fit, writes the trained adapter (PEFT format, with tokenizer files) to `dirpath`.

    With `best=True` and a ModelCheckpoint monitoring a metric, the best checkpoint's weights are exported.
    The directory is written atomically (`outputs.atomic_directory`): a kill during the export leaves the previous
    export or none, never a partial one. A fit that finds its run already finished (resumed from its last
    checkpoint) writes the adapter when the directory is missing.

    With `every_n_steps`, the adapter as it stands is also written each time the optimizer step count
    (`trainer.global_step`) passes a multiple of it, to `<dirpath>_steps/step_NNNNNN/`: the policies along a run,
    ready for `lit-ft judge` (a judged score against KL over training) or `lit-ft chat`, without a checkpoint's
    optimizer state. Under manual optimization (PPO, GRPO) a training step may take several optimizer steps.
    """

    def __init__(self, dirpath: str = "adapter", best: bool = False, every_n_steps: int | None = None):
        """
        Args:
            dirpath: output directory (adapter_model.safetensors, adapter_config.json, tokenizer files, README.md);
                under `lit-ft`, a relative path is inside the run's directory.
            best: export the best checkpoint of the run's ModelCheckpoint instead of the last weights.
            every_n_steps: also write the adapter every this many optimizer steps, to `<dirpath>_steps/step_N`.
        """
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            from lit_ft.errors import ConfigError

            raise ConfigError(f"ExportAdapter every_n_steps={every_n_steps!r}: expected an integer >= 1 or null")
        self.dirpath, self.best, self.every_n_steps = dirpath, best, every_n_steps
        self._written = False
        self._snapshot_step = 0

    def on_fit_start(self, trainer, pl_module):
        self._written = False
        self._snapshot_step = trainer.global_step  # a resumed run does not rewrite the snapshots it already has

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n, step = self.every_n_steps, trainer.global_step
        if n is None or step // n <= self._snapshot_step // n:
            return
        self._snapshot_step = step
        self._write(trainer, pl_module, Path(f"{self.dirpath}_steps") / f"step_{step:06d}", artifact=False)

    def on_train_end(self, trainer, pl_module):
        check_trained(pl_module)  # a run that trained nothing exports nothing
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
                                   "with `lit-ft export adapter`")
        self._write(trainer, pl_module, self.dirpath, artifact=True)
        self._written = True

    def _write(self, trainer, pl_module, path, artifact: bool):
        state = strategies.gathered_model_state(trainer)  # collective under FSDP: every rank takes part
        if trainer.is_global_zero:
            dm = trainer.datamodule
            kwargs = {"state_dict": state} if state is not None else {}
            with atomic_directory(path) as tmp:
                pl_module.save_adapter(tmp, tokenizer=getattr(dm, "tokenizer", None), **kwargs)
            rank_zero_info(f"adapter written to {path}")
            if artifact:
                log_adapter_artifacts(trainer, pl_module, path)
        trainer.strategy.barrier()
