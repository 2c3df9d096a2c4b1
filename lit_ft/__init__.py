"""lit_ft: PyTorch Lightning modules for LLM fine-tuning (SFT, reward modelling, PPO) over transformers + PEFT.

    from lit_ft import SFTModule, InstructionDataModule, ModelSpec, LoraSpec

The public classes are imported on first use (PEP 562), so `import lit_ft` itself stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SFTModule": "lit_ft.sft",
    "RewardModule": "lit_ft.reward",
    "PPOModule": "lit_ft.ppo",
    "InstructionDataModule": "lit_ft.data.modules",
    "PreferenceDataModule": "lit_ft.data.modules",
    "PromptDataModule": "lit_ft.data.modules",
    "ModelSpec": "lit_ft.models",
    "LoraSpec": "lit_ft.models",
    "OptimSpec": "lit_ft.optim",
    "SamplingSpec": "lit_ft.generation",
    "RewardScorer": "lit_ft.scoring",
    "ExportAdapter": "lit_ft.callbacks",
    "SampleGenerations": "lit_ft.callbacks",
    "WandbLogger": "lit_ft.callbacks",
    "PrintMetrics": "lit_ft.progress",
    "WritePredictions": "lit_ft.inference",
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
