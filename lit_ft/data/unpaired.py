"""The LightningDataModule of KTO: unpaired examples, each a completion labelled desirable or undesirable (TRL's
unpaired preference rows: `prompt`, `completion`, `label`), or preference pairs read as one desirable and one
undesirable example each. Re-exported by `lit_ft.data.modules`.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.data import shared
from lit_ft.data.collate import UnpairedCollator
from lit_ft.data.hh import prompt_for, response_for
from lit_ft.data.readers import SourceSpec
from lit_ft.data.templates import TemplateName, ToolFormat, render_prompt
from lit_ft.validation import check_init

UnpairedFormat = Literal["auto", "unpaired", "prompt_chosen_rejected", "chat", "hh"]


class UnpairedPreferenceDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: UnpairedFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
        tool_format: ToolFormat = "template",
        tokenizer: str | None = None,
        max_length: int = 1024,
        overlong: Literal["drop", "truncate_prompt", "error"] = "truncate_prompt",
        dedup: bool = True,
        skip_bad_rows: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        source: SourceSpec = SourceSpec(),
    ):
        """Unpaired preference data for KTO (`lit_ft.KTOModule`): batches of examples with completion-only
        ``labels``, a ``label`` (desirable or not) each, and the mismatched pairs of KTO's KL estimate (each prompt
        with another row's completion; see lit_ft.data.collate).

        Args:
            train_file: training data: a .json/.jsonl/.csv/.parquet file or a hub dataset name.
            val_file: validation data; None carves ``val_split`` off the training data (pairs stay whole).
            val_split: fraction of the training rows held out (seeded) when there is no ``val_file``.
            format: input shape: unpaired (``prompt``: a string or a message list ending with a user turn;
                ``completion``: a string or a list of one assistant message; ``label``: true for a desirable
                completion, false for an undesirable one), or preference pairs in any shape `PreferenceDataModule`
                reads (prompt_chosen_rejected, chat, hh), each pair one desirable (chosen) and one undesirable
                (rejected) example; or auto (detected from the first row).
            template: how text is rendered: the tokenizer's chat template, the alpaca format, or plain text.
            system_prompt: system prompt for rows that have none ("" renders an empty system turn, so a chat
                template that inserts a default one, as SmolLM2's does, leaves it out).
            tool_format: how tool schemas, calls and results reach a chat template: ``template`` passes them as
                they are (refused where the template drops them), ``hermes`` writes them into plain messages in the
                Hermes form first (`lit_ft.data.tools.hermes_messages`; for templates without tool support).
            tokenizer: tokenizer name or path (the CLI links the model's name here); None = the default model.
            max_length: longest tokenized prompt + completion (also of a mismatched pair, whose prompt is cut from
                the left to fit).
            overlong: examples longer than ``max_length``: drop them, cut the prompt from the left, or error.
            dedup: drop exact duplicate rows (an example and its label; a pair).
            skip_bad_rows: drop and count malformed rows instead of failing on the first.
            batch_size: examples per training batch; at least 2, since KTO's KL estimate pairs each prompt with
                another example's completion of the same batch.
            eval_batch_size: examples per validation batch (at least 2); None = ``batch_size``.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            num_workers: DataLoader worker processes.
            num_proc: processes for tokenization (``datasets.map``); None or 1 = in process.
            seed: seed of the validation split and the shuffling.
            source: the subset and splits of a hub dataset or saved folder, and columns renamed before the
                format is detected.
        """
        check_init("data (UnpairedPreferenceDataModule)", UnpairedPreferenceDataModule, locals())
        super().__init__()
        self.save_hyperparameters()
        shared.plain_hparams(self)
        self.train_file, self.val_file, self.val_split, self.format = train_file, val_file, val_split, format
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(**(source or {}))
        self.template, self.system_prompt, self.tokenizer_name = template, system_prompt, tokenizer
        self.tool_format = tool_format
        self.max_length, self.overlong, self.dedup, self.skip_bad_rows = max_length, overlong, dedup, skip_bad_rows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.tokenizer = None
        self.train_dataset = self.val_dataset = None
        self.train_report = self.val_report = None
        self.val_records: list[dict] = []
        self.label_counts: dict[str, tuple[int, int]] = {}
        """(desirable, undesirable) examples of each split after setup: `{"train": (n_D, n_U), "val": ...}`."""

    prepare_data = shared.prepare_data

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        shared.setup_fit(self, "unpaired")
        for split, ds in (("train", self.train_dataset), ("val", self.val_dataset)):
            labels = ds["label"] if ds is not None and len(ds) else []
            self.label_counts[split] = (sum(labels), len(labels) - sum(labels))
        (d, u), (vd, vu) = self.label_counts["train"], self.label_counts["val"]
        rank_zero_info(f"KTO examples: train {d} desirable, {u} undesirable; validation {vd} desirable, "
                       f"{vu} undesirable")
        if not d or not u:
            rank_zero_warn(f"{self.train_file}: the training data has no {'desirable' if not d else 'undesirable'} "
                           "examples (label true/false): KTO then only pulls the other kind towards or away from the "
                           "reference point; both kinds are what it is made for")

    def collator(self) -> UnpairedCollator:
        return UnpairedCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, desirable completion) of the first ``n`` desirable validation examples."""
        rows = [r for r in self.val_records if r["label"]][:n]
        return [(render_prompt(prompt_for(r, self.template), self.tokenizer, self.template, self.system_prompt,
                               tools=r.get("tools"), tool_format=self.tool_format),
                 response_for(r, r["completion"], self.template)) for r in rows]

    train_dataloader = shared.train_dataloader
    val_dataloader = shared.val_dataloader
