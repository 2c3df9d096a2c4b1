"""Layer 4, data: read files or hub datasets (`readers`; the shipped recipes and `demo:` files: `recipes`), normalise
and check records (`records`, `checks`), render templates (`templates`), tokenize with completion-only labels
(`tokenize`), collate (`collate`), and the LightningDataModules (`modules`, `prompts`, `shared`, `splits`); the demo
arithmetic task and its rewards (`tasks`).

May import: `lit_ft.errors`, `lit_ft.validation`, `lit_ft.models` (the tokenizer), `lit_ft.train` (the resumable
loader).
"""

from lit_ft.data.collate import PackedSFTCollator, PreferenceCollator, PromptCollator, SFTCollator
from lit_ft.data.modules import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.data.readers import DataReport, read_rows
from lit_ft.data.records import load_records
from lit_ft.data.templates import render_pair, render_prompt, render_segments
from lit_ft.data.tokenize import tokenize_records, tokenize_segments

__all__ = [
    "DataReport",
    "InstructionDataModule",
    "PackedSFTCollator",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "SFTCollator",
    "load_records",
    "read_rows",
    "render_pair",
    "render_prompt",
    "render_segments",
    "tokenize_records",
    "tokenize_segments",
]
