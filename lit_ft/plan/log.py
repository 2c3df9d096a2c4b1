"""`MemoryPlanLog`: the memory plan as one line at the start of a fit, the measured peak at its end."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.plan.memory import estimate

log = logging.getLogger(__name__)


class MemoryPlanLog(L.Callback):
    """Logs `lit_ft.plan.memory` of this fit at setup and, on CUDA, `torch.cuda.max_memory_allocated` at the
    end (logged as `memory/planned_peak_gib` and `memory/measured_peak_gib` too), so every run shows plan vs
    measured. A plan that cannot be made (an unknown module, a config not on disk) is a warning, never an error."""

    def __init__(self, budget: str | None = None):
        """
        Args:
            budget: the size the plan is compared with (e.g. "24GiB"); None = the visible GPU's memory.
        """
        self.budget = budget
        self.plan = None
        self.measured: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        try:
            self.plan = estimate(pl_module, trainer.datamodule, trainer, budget=self.budget or "auto",
                                 target="cuda" if device.type == "cuda" else "cpu", advise=False)
        except Exception as e:  # the plan is advice: it never stops a fit
            rank_zero_warn(f"memory plan: not available ({type(e).__name__}: {e})")
            return
        rank_zero_info(self.plan.one_line())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_fit_end(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        if self.plan is None or device.type != "cuda":
            return
        self.measured = torch.cuda.max_memory_allocated(device)
        rank_zero_info(f"memory plan: planned peak {self.plan.peak / 2**30:.2f} GiB, measured max_memory_allocated "
                       f"{self.measured / 2**30:.2f} GiB (measured/planned {self.measured / max(self.plan.peak, 1):.2f})")
        for logger in trainer.loggers:
            logger.log_metrics({"memory/planned_peak_gib": self.plan.peak / 2**30,
                                "memory/measured_peak_gib": self.measured / 2**30}, step=trainer.global_step)
