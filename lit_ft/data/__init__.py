"""Data: read and normalise records, render templates, tokenize, collate, and the LightningDataModules."""

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
