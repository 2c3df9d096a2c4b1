"""lit_ft: PyTorch Lightning modules for LLM fine-tuning (SFT, reward modelling, DPO, KTO, PPO, GRPO) over transformers +
PEFT, every role an adapter on one base.

    from lit_ft import SFTModule, InstructionDataModule, ModelSpec, LoraSpec

These names are the stable public surface: configs name them as `lit_ft.<Name>` (`class_path: lit_ft.SFTModule`).
They are imported on first use (PEP 562), so `import lit_ft` itself stays instant. The subpackages are layers,
imports pointing only down (ARCHITECTURE.md; `tests/test_layers.py` checks it):

    errors, validation < losses < models < train < data < online < stages < callbacks < plan < cli

A module path of the layout before the subpackages (`lit_ft.sft`, `lit_ft.resume`, ...) still imports, as the
module it became, with one FutureWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_EXPORTS = {
    # stages
    "SFTModule": "lit_ft.stages.sft",
    "RewardModule": "lit_ft.stages.reward",
    "DPOModule": "lit_ft.stages.dpo",
    "DPOSpec": "lit_ft.stages.dpo",
    "KTOModule": "lit_ft.stages.kto",
    "KTOSpec": "lit_ft.stages.kto",
    "PPOModule": "lit_ft.stages.ppo",
    "PPOSpec": "lit_ft.stages.ppo_spec",
    "GRPOModule": "lit_ft.stages.grpo",
    "DistillModule": "lit_ft.stages.distill",
    "DistillSpec": "lit_ft.stages.distill_spec",
    "GRPOSpec": "lit_ft.stages.grpo_spec",
    # multi-turn episodes
    "Environment": "lit_ft.online.episodes",
    "EpisodeSpec": "lit_ft.online.episodes",
    "CalculatorEnvironment": "lit_ft.online.calculator",
    # data
    "InstructionDataModule": "lit_ft.data.modules",
    "PreferenceDataModule": "lit_ft.data.modules",
    "PromptDataModule": "lit_ft.data.modules",
    "UnpairedPreferenceDataModule": "lit_ft.data.modules",
    # settings
    "ModelSpec": "lit_ft.models.spec",
    "LoraSpec": "lit_ft.models.spec",
    "OptimSpec": "lit_ft.train.optim",
    "SamplingSpec": "lit_ft.online.generation",
    # scoring a reward export
    "RewardScorer": "lit_ft.online.scoring",
    # what configs put on the Trainer
    "AtomicCheckpointIO": "lit_ft.train.resume",
    "OOMAdvice": "lit_ft.train.guards",
    "WandbLogger": "lit_ft.callbacks.logging",
    "LearningRateMonitor": "lit_ft.callbacks.logging",
    "ThroughputLogger": "lit_ft.callbacks.logging",
    "ExportAdapter": "lit_ft.callbacks.export",
    "SampleGenerations": "lit_ft.callbacks.heldout",
    "HeldOutEpisodes": "lit_ft.callbacks.episodes",
    "PrintMetrics": "lit_ft.callbacks.progress",
    "MetricsPlot": "lit_ft.callbacks.plots",
    "WritePredictions": "lit_ft.callbacks.predictions",
    "MemoryPlanLog": "lit_ft.plan.log",
    "fit_memory": "lit_ft.plan.auto",  # `--memory` from Python: fit_memory(module, datamodule, trainer, "auto")
    # errors
    "ConfigError": "lit_ft.errors",
    "DataError": "lit_ft.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_ft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# ---------------------------------------------------------------------------------------------- moved modules

MOVED = {
    "lit_ft.losses_pref": "lit_ft.losses.preference", "lit_ft.rl": "lit_ft.losses",
    "lit_ft.rl_masked": "lit_ft.losses.masked", "lit_ft.rl_group": "lit_ft.losses.group",
    "lit_ft.model_load": "lit_ft.models.load", "lit_ft.model_lora": "lit_ft.models.lora",
    "lit_ft.families": "lit_ft.models.families", "lit_ft.default_model": "lit_ft.models.default",
    "lit_ft.neftune": "lit_ft.models.neftune", "lit_ft.model_card": "lit_ft.models.card",
    "lit_ft.integrity": "lit_ft.train.integrity", "lit_ft.checkpointing": "lit_ft.train.checkpointing",
    "lit_ft.resume": "lit_ft.train.resume", "lit_ft.runs": "lit_ft.train.runs", "lit_ft.rundirs": "lit_ft.train.rundirs",
    "lit_ft.guards": "lit_ft.train.guards", "lit_ft.optim": "lit_ft.train.optim", "lit_ft.metrics": "lit_ft.train.metrics",
    "lit_ft.strategies": "lit_ft.train.strategies",
    "lit_ft.recipes": "lit_ft.data.recipes", "lit_ft.tasks": "lit_ft.data.tasks",
    "lit_ft.generation": "lit_ft.online.generation", "lit_ft.rollout": "lit_ft.online.sampler",
    "lit_ft.rollout_ops": "lit_ft.online.engine_ops", "lit_ft.roles": "lit_ft.online.roles",
    "lit_ft.scoring": "lit_ft.online.scoring",
    "lit_ft.sft": "lit_ft.stages.sft", "lit_ft.reward": "lit_ft.stages.reward", "lit_ft.ppo": "lit_ft.stages.ppo",
    "lit_ft.grpo": "lit_ft.stages.grpo", "lit_ft.dpo": "lit_ft.stages.dpo", "lit_ft.dpo_ref": "lit_ft.stages.dpo_ref",
    "lit_ft.ppo_spec": "lit_ft.stages.ppo_spec", "lit_ft.grpo_spec": "lit_ft.stages.grpo_spec",
    "lit_ft.heldout": "lit_ft.callbacks.heldout", "lit_ft.progress": "lit_ft.callbacks.progress",
    "lit_ft.plots": "lit_ft.callbacks.plots", "lit_ft.inference": "lit_ft.callbacks.predictions",
    "lit_ft.plan_activations": "lit_ft.plan.activations", "lit_ft.plan_data": "lit_ft.plan.rows",
    "lit_ft.plan_log": "lit_ft.plan.log", "lit_ft.plan_online": "lit_ft.plan.online",
    "lit_ft.plan_stages": "lit_ft.plan.stages", "lit_ft.plan_weights": "lit_ft.plan.weights",
    "lit_ft.export": "lit_ft.cli.export", "lit_ft.gguf_export": "lit_ft.cli.gguf", "lit_ft.chat": "lit_ft.cli.chat",
    "lit_ft.demo": "lit_ft.cli.demo",
}
"""Module paths of the layout before the subpackages (2026-12-06) -> the module each became."""

WARNED: set[str] = set()
"""Old paths already reported in this process (the command reports a config's old paths itself, all in one line)."""


def public_name(path: str) -> str | None:
    """`lit_ft.<Name>` for a dotted path to a public class under any module path (old or new), else None."""
    name = path.rpartition(".")[2]
    return f"lit_ft.{name}" if name in _EXPORTS and path != f"lit_ft.{name}" else None


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it became (the same module object), warning once."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        if spec.name not in WARNED:
            WARNED.add(spec.name)
            names = sorted(f"lit_ft.{n}" for n, m in _EXPORTS.items() if m == MOVED[spec.name])
            public = f"; configs name its classes as {', '.join(names)}" if names else ""
            warnings.warn(f"{spec.name} has moved to {MOVED[spec.name]}{public}", FutureWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())
