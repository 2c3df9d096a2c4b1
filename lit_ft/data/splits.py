"""The test and predict splits of the datamodules (`lit-ft test`, `lit-ft predict`).

A test file has the shape of the training data and is scored like the validation set; a predict file holds prompts
(any prompt shape `PromptDataModule` reads: `prompt` text or messages, `instruction` (+`input`), `messages`,
`question`, or instruction data whose responses are ignored), optionally with an `answer` to score against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

from lit_ft.data.collate import PromptCollator
from lit_ft.data.records import Kind, load_records
from lit_ft.data.shared import tokenize_split
from lit_ft.errors import ConfigError


def labelled_split(module, kind: Kind, settings: dict, **read):
    """The tokenized `data.test_file` of a datamodule, read and checked like its validation file."""
    if not module.test_file:
        raise ConfigError("data.test_file: `test` needs a test file (same format as data.train_file)")
    records, report = load_records(module.test_file, kind, setting="data.test_file", **read)
    return tokenize_split(records, kind, report, module.test_file, module.num_proc, True, **settings)


def prompt_split(module, settings: dict):
    """The tokenized prompts of `data.predict_file`, each with its source line and its prompt as written."""
    if not module.predict_file:
        raise ConfigError("data.predict_file: `predict` needs a file of prompts (JSONL rows with a `prompt`, "
                          "`instruction`, `messages` or `question` field; an `answer` is optional)")
    records, report = load_records(module.predict_file, "prompt", setting="data.predict_file",
                                   skip_bad_rows=module.skip_bad_rows, dedup=False)
    module.predict_sources = {r["line"]: _as_text(r["prompt"]) for r in records}
    return tokenize_split(records, "prompt", report, module.predict_file, module.num_proc, True, **settings)


def _as_text(prompt) -> str:
    """A prompt as the user wrote it: its text, or the last message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1].get("content", "")) if prompt else ""


@dataclass
class PredictCollator:
    """`PromptCollator`'s left-padded batches plus each row's source `lines` and prompt as written (`sources`)."""

    prompts: PromptCollator
    """The collator of the prompt tokens."""
    sources: dict
    """line -> the prompt as the file has it."""

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.prompts(rows)
        batch["lines"] = [r["line"] for r in rows]
        batch["sources"] = [self.sources.get(r["line"], r["prompt"]) for r in rows]
        return batch


def predict_loader(module) -> DataLoader:
    """Ordered batches of the predict prompts."""
    collate = PredictCollator(PromptCollator(module.tokenizer.pad_token_id, module.pad_to_multiple_of),
                              module.predict_sources)
    return DataLoader(module.predict_dataset, batch_size=module.eval_batch_size or module.batch_size, shuffle=False,
                      collate_fn=collate, num_workers=module.num_workers)
