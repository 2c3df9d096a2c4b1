"""Layer 4, data: read files or hub datasets (`readers`; the shipped recipes and `demo:` files: `recipes`), normalise
and check records (`records`, `checks`; the HH-RLHF format: `hh`), render templates (`templates`), tokenize with completion-only labels
(`tokenize`), collate (`collate`), and the LightningDataModules (`modules`, `prompts`, `unpaired`, `shared`, `splits`); the demo
arithmetic task and its rewards (`tasks`).

May import: `lit_ft.errors`, `lit_ft.validation`, `lit_ft.models` (the tokenizer), `lit_ft.train` (the resumable
loader).
"""

import importlib

_EXPORTS = {
    "PackedSFTCollator": "collate", "PreferenceCollator": "collate", "PromptCollator": "collate",
    "SFTCollator": "collate", "SharedPromptCollator": "collate", "InstructionDataModule": "modules",
    "PreferenceDataModule": "modules",
    "PromptDataModule": "modules", "UnpairedPreferenceDataModule": "modules", "UnpairedCollator": "collate",
    "DataReport": "readers", "read_rows": "readers", "load_records": "records",
    "render_pair": "templates", "render_prompt": "templates", "render_segments": "templates",
    "tokenize_records": "tokenize", "tokenize_segments": "tokenize",
}
"""Imported on first use, so the command's recipe lookup (`lit_ft.data.recipes`) loads no Lightning."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_ft.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lit_ft.data.{_EXPORTS[name]}"), name)
