"""A callback that keeps chosen logged metrics per training step and draws them (score and KL) at the end of fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class MetricsPlot(L.Callback):
    """Records `metrics` after every training batch and writes a PNG (one panel per metric) plus a JSON of the
    series at the end of fit. Its history is part of the checkpoint, so a resumed run draws the whole run."""

    def __init__(self, path: str = "runs/ppo/metrics.png",
                 metrics: list[str] = ["objective/scores", "objective/kl"], title: str | None = None):
        """
        Args:
            path: PNG to write (the series go next to it, same name with `.json`).
            metrics: logged metric names to record; each gets a panel (x axis: training batch = PPO rollout).
            title: figure title; None = the file's stem.
        """
        self.path, self.metrics, self.title = Path(path), list(metrics), title
        self.history: dict[str, list[tuple[int, float]]] = {m: [] for m in self.metrics}
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if value is not None and value.numel() == 1 and math.isfinite(float(value)):
                series = self.history.setdefault(name, [])
                if not series or series[-1][0] != self._batches:
                    series.append((self._batches, float(value)))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and any(self.history.values()):
            self.write()

    def write(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.path.parent.mkdir(parents=True, exist_ok=True)
        names = [m for m in self.metrics if self.history.get(m)]
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), sharex=True, squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            xs, ys = zip(*self.history[name])
            ax.plot(xs, ys, marker="." if len(xs) < 60 else None, linewidth=1.2)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("rollout (training batch)")
        fig.suptitle(self.title or self.path.stem)
        fig.tight_layout()
        fig.savefig(self.path, dpi=110)
        plt.close(fig)
        self.path.with_suffix(".json").write_text(json.dumps(self.history, indent=1))
        rank_zero_info(f"metrics plot written to {self.path}")
        return self.path

    def state_dict(self) -> dict:
        return {"history": self.history, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()}
        self._batches = int(state.get("batches", 0))
