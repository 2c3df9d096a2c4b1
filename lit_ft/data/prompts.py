"""The LightningDataModule of the online stages (PPO, GRPO): prompts with optional ground-truth answers, in
left-padded batches. Re-exported by `lit_ft.data.modules` (configs name it `lit_ft.data.modules.PromptDataModule`).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import LightningDataModule

from lit_ft.data import shared, splits
from lit_ft.data.collate import PromptCollator
from lit_ft.data.readers import SourceSpec
from lit_ft.data.hh import prompt_for
from lit_ft.data.templates import TemplateName, ToolFormat, render_prompt
from lit_ft.validation import check_init

PromptFormat = Literal["auto", "prompt", "instruction", "messages", "question", "preference"]


class PromptDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: PromptFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
        tool_format: ToolFormat = "template",
        tokenizer: str | None = None,
        max_length: int = 512,
        overlong: Literal["drop", "truncate_prompt", "error"] = "truncate_prompt",
        answer_field: str | None = "answer",
        dedup: bool = True,
        skip_bad_rows: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        source: SourceSpec = SourceSpec(),
        predict_file: str | None = None,
    ):
        """Prompts (with optional ground-truth answers) for PPO rollouts; batches are left-padded.

        Args:
            train_file: prompts: a .json/.jsonl/.csv/.parquet file or a hub dataset name.
            val_file: validation prompts; None carves ``val_split`` off the training data.
            val_split: fraction of the prompts held out (seeded) when there is no ``val_file``.
            format: where the prompt is: a prompt column (text or messages), instruction (+input), messages
                (all but a final assistant turn), question, preference (the prompt of a pair), or auto.
            template: how prompts are rendered: the tokenizer's chat template, the alpaca format, or plain text.
            system_prompt: system prompt for rows that have none ("" renders an empty system turn, so a chat
                template that inserts a default one, as SmolLM2's does, leaves it out).
            tool_format: how tool schemas, calls and results reach a chat template: ``template`` passes them as
                they are (refused where the template drops them), ``hermes`` writes them into plain messages in the
                Hermes form first (`lit_ft.data.tools.hermes_messages`; for templates without tool support).
            tokenizer: tokenizer name or path (the CLI links the model's name here); None = the default model.
            max_length: longest tokenized prompt.
            overlong: prompts longer than ``max_length``: drop them, keep their last tokens, or error.
            answer_field: column holding the ground-truth answer for verifiable rewards; None = no answers.
            dedup: drop exact duplicate prompts.
            skip_bad_rows: drop and count malformed rows instead of failing on the first.
            batch_size: prompts per rollout batch.
            eval_batch_size: prompts per validation batch; None = ``batch_size``.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            num_workers: DataLoader worker processes.
            num_proc: processes for tokenization (``datasets.map``); None or 1 = in process.
            seed: seed of the validation split and the shuffling.
            source: the subset and splits of a hub dataset or saved folder, and columns renamed before the
                format is detected.
            predict_file: prompts for `predict` (rows with `prompt`, `instruction`, `messages` or `question`;
                an optional `answer`); the generations go to the `WritePredictions` callback's file.
        """
        check_init("data (PromptDataModule)", PromptDataModule, locals())
        super().__init__()
        self.save_hyperparameters()
        shared.plain_hparams(self)
        self.train_file, self.val_file, self.val_split, self.format = train_file, val_file, val_split, format
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(**(source or {}))
        self.template, self.system_prompt, self.tokenizer_name = template, system_prompt, tokenizer
        self.tool_format = tool_format
        self.max_length, self.overlong, self.answer_field = max_length, overlong, answer_field
        self.dedup, self.skip_bad_rows, self.batch_size, self.eval_batch_size = dedup, skip_bad_rows, batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.predict_file = predict_file
        self.tokenizer = None
        self.train_dataset = self.val_dataset = self.predict_dataset = None
        self.train_report = self.val_report = None
        self.val_records: list[dict] = []

    prepare_data = shared.prepare_data

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if self.predict_dataset is None:
                self.predict_dataset = splits.prompt_split(self, shared.inference_settings(self))
            return
        if self.train_dataset is not None:
            return
        shared.setup_fit(self, "prompt", answer_field=self.answer_field)

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, answer) of the first ``n`` validation records that have an answer."""
        rows = [r for r in self.val_records if r.get("answer") is not None][:n]
        return [(render_prompt(prompt_for(r, self.template), self.tokenizer, self.template, self.system_prompt,
                               r.get("input"), r.get("tools"), self.tool_format),
                 r["answer"]) for r in rows]

    train_dataloader = shared.train_dataloader
    val_dataloader = shared.val_dataloader
    predict_dataloader = splits.predict_loader
