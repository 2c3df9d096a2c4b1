"""LightningDataModules for the stages: instruction (SFT), preference (reward model, DPO), prompt (PPO, GRPO) and
unpaired preference (KTO) data.

Usable without the CLI::

    dm = InstructionDataModule(train_file="train.jsonl", tokenizer="path/to/model")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

``setup`` reads, validates, normalises, filters and tokenizes; ``train_report``/``val_report`` hold the row
counts (read = kept + dropped, per reason), logged at the end of setup. What the modules share (reading,
splitting, tokenizing a split, the loaders) is in `lit_ft.data.shared`; `PromptDataModule` is in
`lit_ft.data.prompts` and `UnpairedPreferenceDataModule` in `lit_ft.data.unpaired`. They are re-exported here, so
every name keeps its `lit_ft.data.modules` path.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_ft.data import shared, splits
from lit_ft.data.collate import (
    PackedPreferenceCollator, PackedSFTCollator, PreferenceCollator, SFTCollator, SharedPromptCollator,
)
from lit_ft.data.prompts import PromptDataModule, PromptFormat  # noqa: F401 (re-exported)
from lit_ft.data.unpaired import UnpairedFormat, UnpairedPreferenceDataModule  # noqa: F401 (re-exported)
from lit_ft.data.readers import SourceSpec
from lit_ft.data.shared import (  # noqa: F401 (re-exported)
    check_score_filter, fit_context, load_splits, load_tokenizer_for, make_loader, plain_hparams, prepare_hub,
    split_records, tokenize_split,
)
from lit_ft.data.hh import messages_for, prompt_for, response_for
from lit_ft.data.templates import TemplateName, ToolFormat, check_template, render_prompt
from lit_ft.data.tokenize import Overlong
from lit_ft.validation import check_init

InstructionFormat = Literal["auto", "alpaca", "prompt_completion", "messages", "question_answer", "preference"]
PreferenceFormat = Literal["auto", "prompt_chosen_rejected", "chat", "hh"]


class InstructionDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: InstructionFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
        tool_format: ToolFormat = "template",
        tokenizer: str | None = None,
        max_length: int = 1024,
        overlong: Overlong = "truncate_prompt",
        completion_only: bool = True,
        dedup: bool = True,
        score_field: str | None = None,
        min_score: float | None = None,
        packing: bool = False,
        skip_bad_rows: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        source: SourceSpec = SourceSpec(),
        test_file: str | None = None,
        predict_file: str | None = None,
    ):
        """Instruction data for supervised fine-tuning.

        Args:
            train_file: training data: a .json/.jsonl/.csv/.parquet file or a hub dataset name.
            val_file: validation data; None carves ``val_split`` off the training data.
            val_split: fraction of the training rows held out (seeded) when there is no ``val_file``.
            format: input shape: alpaca (instruction/input/output), prompt_completion, messages (chat),
                question_answer, preference (the chosen side of preference pairs, any shape the preference data
                reads: SFT before RLHF on the same file), or auto (detected from the first row).
            template: how text is rendered: the tokenizer's chat template, the alpaca format, or plain text.
            system_prompt: system prompt for rows that have none ("" renders an empty system turn, so a chat
                template that inserts a default one, as SmolLM2's does, leaves it out).
            tool_format: how tool schemas, calls and results reach a chat template: ``template`` passes them as
                they are (refused where the template drops them), ``hermes`` writes them into plain messages in the
                Hermes form first (`lit_ft.data.tools.hermes_messages`; for templates without tool support).
            tokenizer: tokenizer name or path (the CLI links the model's name here); None = the default model.
            max_length: longest tokenized row.
            overlong: rows longer than ``max_length``: drop them, truncate the prompt from the left, or error.
            completion_only: train on response tokens only (prompt labels are -100).
            dedup: drop exact duplicate rows.
            score_field: numeric column used with ``min_score`` to filter rows.
            min_score: drop rows whose ``score_field`` is below this.
            packing: pack rows padding-free into rows of ``max_length`` with restarting ``position_ids``.
            skip_bad_rows: drop and count malformed rows instead of failing on the first.
            batch_size: training rows per batch.
            eval_batch_size: validation rows per batch; None = ``batch_size``.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            num_workers: DataLoader worker processes.
            num_proc: processes for tokenization (``datasets.map``); None or 1 = in process.
            seed: seed of the validation split and the shuffling.
            group_by_length: batches of rows of similar length (less padding; transformers' group_by_length):
                the shuffled rows in mega-batches of 50 batches, each sorted by length. Resumes exactly.
            source: the subset and splits of a hub dataset or saved folder, and columns renamed before the
                format is detected.
            test_file: data for `test`, in the training data's format (scored as validation is).
            predict_file: prompts for `predict` (rows with `prompt`, `instruction`, `messages` or `question`;
                an optional `answer`); the generations go to the `WritePredictions` callback's file.
        """
        check_init("data (InstructionDataModule)", InstructionDataModule, locals())
        check_score_filter(score_field, min_score)
        super().__init__()
        self.save_hyperparameters()
        plain_hparams(self)
        self.train_file, self.val_file, self.val_split, self.format = train_file, val_file, val_split, format
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(**(source or {}))
        self.template, self.system_prompt, self.tokenizer_name = template, system_prompt, tokenizer
        self.tool_format = tool_format
        self.max_length, self.overlong, self.completion_only = max_length, overlong, completion_only
        self.dedup, self.score_field, self.min_score, self.packing = dedup, score_field, min_score, packing
        self.skip_bad_rows, self.batch_size, self.eval_batch_size = skip_bad_rows, batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.test_file, self.predict_file, self.group_by_length = test_file, predict_file, group_by_length
        self.tokenizer = None
        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None
        self.train_report = self.val_report = None
        self.val_records: list[dict] = []

    prepare_data = shared.prepare_data

    def setup(self, stage: str | None = None) -> None:
        if stage in ("test", "predict"):
            return self._setup_inference(stage)
        if self.train_dataset is not None:
            return
        shared.setup_fit(self, "instruction", {"completion_only": self.completion_only},
                         score_field=self.score_field, min_score=self.min_score)

    def _setup_inference(self, stage: str) -> None:
        """Only the split `test` or `predict` reads (the training file is not read)."""
        settings = shared.inference_settings(self)
        check_template(self.template, self.tokenizer)
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = splits.prompt_split(self, settings)
        elif stage == "test" and self.test_dataset is None:
            self.test_dataset = splits.labelled_split(
                self, "instruction", dict(settings, completion_only=self.completion_only), format=self.format,
                skip_bad_rows=self.skip_bad_rows, dedup=False)

    test_dataloader = shared.test_dataloader
    predict_dataloader = splits.predict_loader

    def collator(self):
        pad = self.tokenizer.pad_token_id
        if self.packing:
            return PackedSFTCollator(pad, self.max_length, self.pad_to_multiple_of)
        return SFTCollator(pad, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        lengths = [len(x) for x in self.train_dataset["input_ids"]] if self.group_by_length else None
        return make_loader(self.train_dataset, self.batch_size, self.collator(), self.num_workers, True, self.seed,
                           lengths)

    val_dataloader = shared.val_dataloader

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, reference response) of the first ``n`` validation records."""
        out = []
        for record in self.val_records[:n]:
            messages = messages_for(record, self.template)
            prompt = render_prompt(messages[:-1], self.tokenizer, self.template, self.system_prompt,
                                   record.get("input"), record.get("tools"), self.tool_format)
            out.append((prompt, messages[-1]["content"]))
        return out


class PreferenceDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: PreferenceFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
        tool_format: ToolFormat = "template",
        tokenizer: str | None = None,
        max_length: int = 1024,
        overlong: Literal["drop", "truncate_prompt", "error"] = "truncate_prompt",
        dedup: bool = True,
        skip_bad_rows: bool = False,
        group_field: str | None = None,
        packing: bool = False,
        share_prompt: bool | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        source: SourceSpec = SourceSpec(),
        test_file: str | None = None,
    ):
        """Preference pairs for Bradley-Terry reward modelling and DPO (batches hold chosen rows, then rejected
        rows, with completion-only ``labels``; see lit_ft.data.collate).

        Args:
            train_file: training pairs: a .json/.jsonl/.csv/.parquet file or a hub dataset name.
            val_file: validation pairs; None carves ``val_split`` off the training data.
            val_split: fraction of the training pairs held out (seeded) when there is no ``val_file``.
            format: input shape: prompt_chosen_rejected (strings), chat (chosen/rejected message lists: whole
                conversations sharing all but the last turn, or, with a `prompt` message list, TRL's explicit-prompt
                form where each is a list of one assistant message), hh (HH-RLHF full conversations without a
                prompt), or auto (detected from the first row).
            template: how text is rendered: the tokenizer's chat template, the alpaca format, or plain text.
            system_prompt: system prompt for rows that have none ("" renders an empty system turn, so a chat
                template that inserts a default one, as SmolLM2's does, leaves it out).
            tool_format: how tool schemas, calls and results reach a chat template: ``template`` passes them as
                they are (refused where the template drops them), ``hermes`` writes them into plain messages in the
                Hermes form first (`lit_ft.data.tools.hermes_messages`; for templates without tool support).
            tokenizer: tokenizer name or path (the CLI links the model's name here); None = the default model.
            max_length: longest tokenized prompt + response.
            overlong: pairs longer than ``max_length``: drop them, cut the shared prompt from the left, or error.
            dedup: drop exact duplicate pairs.
            skip_bad_rows: drop and count malformed rows instead of failing on the first.
            group_field: a column naming each pair's subset (its source, its kind of error...): validation then
                reports `val/accuracy/<subset>` beside the overall accuracy, as reward benchmarks do.
            packing: pack each batch's chosen and rejected sequences padding-free into rows of ``max_length``
                (`PackedPreferenceCollator`): the same pairs a batch and the same loss (DPO and the reward model),
                computed over the real tokens only; pays when lengths vary (HH pairs: 43% of a padded batch's tokens
                are real). Needs an attention that derives the mask from restarting position ids (probed once).
            share_prompt: each pair as ONE sequence, its prompt once and both responses after it, the rejected
                one masked from the chosen one (`SharedPromptCollator`, `lit_ft.models.shared_prompt`): the same
                log-probs and rewards from P fewer tokens a pair in every pass; with ``packing`` pairs are packed
                into rows of 2 x ``max_length``. Needs SDPA or eager attention over a model without recurrent
                layers (probed once, refused by name). None (the default): `--memory auto` decides (on where the
                model's family takes it), else off.
            batch_size: pairs per training batch (the model sees twice as many rows).
            eval_batch_size: pairs per validation batch; None = ``batch_size``.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            num_workers: DataLoader worker processes.
            num_proc: processes for tokenization (``datasets.map``); None or 1 = in process.
            seed: seed of the validation split and the shuffling.
            source: the subset and splits of a hub dataset or saved folder, and columns renamed before the
                format is detected.
            test_file: data for `test`, in the training data's format (scored as validation is).
        """
        check_init("data (PreferenceDataModule)", PreferenceDataModule, locals())
        super().__init__()
        self.save_hyperparameters()
        plain_hparams(self)
        self.train_file, self.val_file, self.val_split, self.format = train_file, val_file, val_split, format
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(**(source or {}))
        self.template, self.system_prompt, self.tokenizer_name = template, system_prompt, tokenizer
        self.tool_format = tool_format
        self.max_length, self.overlong, self.dedup, self.skip_bad_rows = max_length, overlong, dedup, skip_bad_rows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.group_field, self.test_file = group_field, test_file
        self.test_dataset = None
        self.group_field, self.packing, self.share_prompt = group_field, packing, share_prompt
        self.val_records: list[dict] = []
        self.val_groups: list[str] = []
        """The subsets of the validation pairs, sorted (empty without `group_field`)."""
        self.tokenizer = None
        self.train_dataset = self.val_dataset = None
        self.train_report = self.val_report = None

    prepare_data = shared.prepare_data

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            if self.test_dataset is None:
                self.test_dataset = splits.labelled_split(self, "preference", shared.inference_settings(self),
                                                          format=self.format, skip_bad_rows=self.skip_bad_rows,
                                                          dedup=False, group_field=self.group_field)
            return
        if self.train_dataset is not None:
            return
        shared.setup_fit(self, "preference", group_field=self.group_field)
        self.val_groups = sorted({r["group"] for r in self.val_records}) if self.group_field else []

    def collator(self) -> PreferenceCollator | PackedPreferenceCollator | SharedPromptCollator:
        if self.share_prompt:
            return SharedPromptCollator(self.tokenizer.pad_token_id, 2 * self.max_length if self.packing else None,
                                        self.pad_to_multiple_of)
        if self.packing:
            return PackedPreferenceCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)
        return PreferenceCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, chosen response) of the first ``n`` validation pairs (greedy-answer checks)."""
        return [(render_prompt(prompt_for(r, self.template), self.tokenizer, self.template, self.system_prompt,
                               tools=r.get("tools"), tool_format=self.tool_format),
                 response_for(r, r["chosen"], self.template))
                for r in self.val_records[:n]]

    train_dataloader = shared.train_dataloader
    val_dataloader = shared.val_dataloader
    test_dataloader = shared.test_dataloader
