"""LightningDataModules for the three stages: instruction (SFT), preference (reward model) and prompt (PPO) data.

Usable without the CLI::

    dm = InstructionDataModule(train_file="train.jsonl", tokenizer="path/to/model")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

``setup`` reads, validates, normalises, filters and tokenizes; ``train_report``/``val_report`` hold the row
counts (read = kept + dropped, per reason), logged at the end of setup.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_ft.data import splits
from lit_ft.data.checks import bound_lengths, check_context, drop_control_tokens
from lit_ft.data.collate import PackedPreferenceCollator, PackedSFTCollator, PreferenceCollator, PromptCollator, \
    SFTCollator
from lit_ft.data.readers import DataReport, SourceSpec, is_hub_name, read_rows
from lit_ft.data.records import Kind, load_records
from lit_ft.data.templates import TemplateName, check_template, render_prompt
from lit_ft.data.tokenize import Overlong, tokenize_records
from lit_ft.errors import ConfigError, DataError
from lit_ft.resume import ResumableDataLoader
from lit_ft.validation import check_init

InstructionFormat = Literal["auto", "alpaca", "prompt_completion", "messages", "question_answer"]
PreferenceFormat = Literal["auto", "prompt_chosen_rejected", "chat", "hh"]
PromptFormat = Literal["auto", "prompt", "instruction", "messages", "question", "preference"]


def check_score_filter(score_field: str | None, min_score: float | None) -> None:
    """The quality filter needs both settings; one alone would silently filter nothing."""
    if (score_field is None) != (min_score is None):
        given, missing = ("data.min_score", "data.score_field") if score_field is None else \
            ("data.score_field", "data.min_score")
        raise ConfigError(f"{given} is set but {missing} is not: the score filter needs both (or neither)")


def split_records(records: list[dict], report: DataReport, val_split: float, seed: int):
    """Carve a seeded validation split off one file's records.

    The file's drops stay on the train report; the val report reads the rows it was given, so both keep
    ``rows_read == rows_kept + dropped``.
    """
    if not 0.0 <= val_split < 1.0:
        raise ConfigError(f"data.val_split must be in [0, 1), got {val_split}")
    n = len(records)
    n_val = min(max(round(n * val_split), 1 if val_split > 0 and n >= 2 else 0), max(n - 1, 0))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    report.rows_read -= n_val
    report.rows_kept -= n_val
    val_report = DataReport(source=f"{report.source} (val split)", rows_read=n_val, rows_kept=n_val)
    return train, report, val, val_report


def load_splits(kind: Kind, train_file: str, val_file: str | None, val_split: float, seed: int,
                source: SourceSpec | None = None, **read):
    """(train_records, train_report, val_records, val_report) from a train file and a val file or split."""
    source = source or SourceSpec()
    read.update(subset=source.subset, columns=source.columns)
    train, train_report = load_records(train_file, kind, setting="data.train_file", split=source.train_split, **read)
    if val_file:
        val, val_report = load_records(val_file, kind, setting="data.val_file", split=source.val_split, **read)
        return train, train_report, val, val_report
    return split_records(train, train_report, val_split, seed)


def tokenize_split(records: list[dict], kind: Kind, report: DataReport, file: str, num_proc: int | None,
                   required: bool, **settings):
    """Tokenize one split, log its report, and refuse an empty training set."""
    records, refused = bound_lengths(records, kind, settings["tokenizer"], settings["max_length"],
                                     settings["overlong"], report, file, settings["template"])
    if refused is not None:  # tokenize the rows before it: one of them may be too long by tokens, and earlier
        tokenize_records(records, kind, DataReport(file, len(records), len(records)), num_proc=num_proc, file=file,
                         **settings)
        raise refused
    records = drop_control_tokens(records, settings["tokenizer"], report, file)
    ds = tokenize_records(records, kind, report, num_proc=num_proc, file=file, **settings)
    rank_zero_info(report.summary())
    if required and len(ds) == 0:
        raise DataError(f"no rows left to train on: {report.summary()}", file=file)
    return ds


def make_loader(ds, batch_size: int, collate, num_workers: int, shuffle: bool, seed: int,
                lengths: list[int] | None = None) -> DataLoader:
    """Training (shuffle=True): a seeded loader whose position is saved in checkpoints and restored on resume,
    mid-epoch included (`lit_ft.resume.ResumableDataLoader`; `lengths`: length-grouped batches). Evaluation: a
    plain ordered DataLoader."""
    if shuffle:
        return ResumableDataLoader(ds, batch_size=batch_size, shuffle=True, seed=seed, collate_fn=collate,
                                   num_workers=num_workers, lengths=lengths)
    # A private generator: each new iterator draws a base seed, which must not shift the global torch RNG
    # (a validation pass would otherwise change the dropout masks of the training steps after it).
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def plain_hparams(dm: LightningDataModule) -> None:
    """The saved hyper-parameters as plain values (`source` as a dict): checkpoints keep loading with
    `torch.load(weights_only=True)` and `hparams.yaml` with `yaml.safe_load`."""
    import copy
    import dataclasses

    if dataclasses.is_dataclass(dm.hparams.get("source")):
        dm.hparams["source"] = dataclasses.asdict(dm.hparams["source"])
        dm._hparams_initial = copy.deepcopy(dm._hparams)


def load_tokenizer_for(name: str | None):
    from lit_ft.models import load_tokenizer

    return load_tokenizer(name)


def fit_context(name: str | None, max_length: int) -> int:
    """``max_length`` clamped to the context of the model whose tokenizer ``name`` is (a warning says so)."""
    from lit_ft.models import resolve_name

    where, gguf = resolve_name(name, "tokenizer")
    return check_context(None if gguf else where, max_length)


def prepare_hub(spec: SourceSpec, train_file: str, val_file: str | None) -> None:
    """Download hub datasets once (rank 0); local files need nothing."""
    for source, split in ((train_file, spec.train_split), (val_file, spec.val_split)):
        if source and is_hub_name(source):
            read_rows(source, split, subset=spec.subset)  # load_dataset caches the download for every rank


class InstructionDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: InstructionFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
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
                question_answer, or auto (detected from the first row).
            template: how text is rendered: the tokenizer's chat template, the alpaca format, or plain text.
            system_prompt: system prompt for rows that have none.
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
        self.max_length, self.overlong, self.completion_only = max_length, overlong, completion_only
        self.dedup, self.score_field, self.min_score, self.packing = dedup, score_field, min_score, packing
        self.skip_bad_rows, self.batch_size, self.eval_batch_size = skip_bad_rows, batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.test_file, self.predict_file, self.group_by_length = test_file, predict_file, group_by_length
        self.tokenizer = None
        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None
        self.train_report = self.val_report = None
        self.val_records: list[dict] = []

    def prepare_data(self) -> None:
        prepare_hub(self.source, self.train_file, self.val_file)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("test", "predict"):
            return self._setup_inference(stage)
        if self.train_dataset is not None:
            return
        self.tokenizer = load_tokenizer_for(self.tokenizer_name)
        self.max_length = fit_context(self.tokenizer_name, self.max_length)
        check_template(self.template, self.tokenizer)
        train, self.train_report, self.val_records, self.val_report = load_splits(
            "instruction", self.train_file, self.val_file, self.val_split, self.seed, source=self.source,
            format=self.format,
            skip_bad_rows=self.skip_bad_rows, dedup=self.dedup, score_field=self.score_field,
            min_score=self.min_score)
        settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                        max_length=self.max_length, overlong=self.overlong, completion_only=self.completion_only)
        self.train_dataset = tokenize_split(train, "instruction", self.train_report, self.train_file,
                                            self.num_proc, True, **settings)
        self.val_dataset = tokenize_split(self.val_records, "instruction", self.val_report,
                                          self.val_file or self.train_file, self.num_proc, False, **settings)

    def _setup_inference(self, stage: str) -> None:
        """Only the split `test` or `predict` reads (the training file is not read)."""
        self.tokenizer = self.tokenizer or load_tokenizer_for(self.tokenizer_name)
        self.max_length = fit_context(self.tokenizer_name, self.max_length)
        check_template(self.template, self.tokenizer)
        settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                        max_length=self.max_length, overlong=self.overlong)
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = splits.prompt_split(self, settings)
        elif stage == "test" and self.test_dataset is None:
            self.test_dataset = splits.labelled_split(
                self, "instruction", dict(settings, completion_only=self.completion_only), format=self.format,
                skip_bad_rows=self.skip_bad_rows, dedup=False)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_dataset, self.eval_batch_size or self.batch_size, self.collator(),
                           self.num_workers, False, self.seed)

    def predict_dataloader(self) -> DataLoader:
        return splits.predict_loader(self)

    def collator(self):
        pad = self.tokenizer.pad_token_id
        if self.packing:
            return PackedSFTCollator(pad, self.max_length, self.pad_to_multiple_of)
        return SFTCollator(pad, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        lengths = [len(x) for x in self.train_dataset["input_ids"]] if self.group_by_length else None
        return make_loader(self.train_dataset, self.batch_size, self.collator(), self.num_workers, True, self.seed,
                           lengths)

    def val_dataloader(self):
        if not self.val_dataset or len(self.val_dataset) == 0:
            return []
        size = self.eval_batch_size or self.batch_size
        return make_loader(self.val_dataset, size, self.collator(), self.num_workers, False, self.seed)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, reference response) of the first ``n`` validation records."""
        out = []
        for record in self.val_records[:n]:
            messages = record["messages"]
            prompt = render_prompt(messages[:-1], self.tokenizer, self.template, self.system_prompt,
                                   record.get("input"))
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
        tokenizer: str | None = None,
        max_length: int = 1024,
        overlong: Literal["drop", "truncate_prompt", "error"] = "truncate_prompt",
        dedup: bool = True,
        skip_bad_rows: bool = False,
        group_field: str | None = None,
        packing: bool = False,
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
            system_prompt: system prompt for rows that have none.
            tokenizer: tokenizer name or path (the CLI links the model's name here); None = the default model.
            max_length: longest tokenized prompt + response.
            overlong: pairs longer than ``max_length``: drop them, cut the shared prompt from the left, or error.
            dedup: drop exact duplicate pairs.
            skip_bad_rows: drop and count malformed rows instead of failing on the first.
            group_field: a column naming each pair's subset (its source, its kind of error...): validation then
                reports `val/accuracy/<subset>` beside the overall accuracy, as reward benchmarks do.
            packing: DPO only: pack each batch's chosen and rejected sequences padding-free into rows of
                ``max_length`` (`PackedPreferenceCollator`); the reward model needs padded rows and refuses it.
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
        self.max_length, self.overlong, self.dedup, self.skip_bad_rows = max_length, overlong, dedup, skip_bad_rows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.group_field, self.test_file = group_field, test_file
        self.test_dataset = None
        self.group_field, self.packing = group_field, packing
        self.val_records: list[dict] = []
        self.val_groups: list[str] = []
        """The subsets of the validation pairs, sorted (empty without `group_field`)."""
        self.tokenizer = None
        self.train_dataset = self.val_dataset = None
        self.train_report = self.val_report = None

    def prepare_data(self) -> None:
        prepare_hub(self.source, self.train_file, self.val_file)

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            if self.test_dataset is None:
                self.tokenizer = self.tokenizer or load_tokenizer_for(self.tokenizer_name)
                self.max_length = fit_context(self.tokenizer_name, self.max_length)
                settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                                max_length=self.max_length, overlong=self.overlong)
                self.test_dataset = splits.labelled_split(self, "preference", settings, format=self.format,
                                                          skip_bad_rows=self.skip_bad_rows, dedup=False,
                                                          group_field=self.group_field)
            return
        if self.train_dataset is not None:
            return
        self.tokenizer = load_tokenizer_for(self.tokenizer_name)
        self.max_length = fit_context(self.tokenizer_name, self.max_length)
        check_template(self.template, self.tokenizer)
        train, self.train_report, val, self.val_report = load_splits(
            "preference", self.train_file, self.val_file, self.val_split, self.seed, source=self.source,
            format=self.format,
            skip_bad_rows=self.skip_bad_rows, dedup=self.dedup, group_field=self.group_field)
        self.val_groups = sorted({r["group"] for r in val}) if self.group_field else []
        self.val_records = val
        settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                        max_length=self.max_length, overlong=self.overlong)
        self.train_dataset = tokenize_split(train, "preference", self.train_report, self.train_file,
                                            self.num_proc, True, **settings)
        self.val_dataset = tokenize_split(val, "preference", self.val_report, self.val_file or self.train_file,
                                          self.num_proc, False, **settings)

    def collator(self) -> PreferenceCollator | PackedPreferenceCollator:
        if self.packing:
            return PackedPreferenceCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)
        return PreferenceCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_dataset, self.eval_batch_size or self.batch_size, self.collator(),
                           self.num_workers, False, self.seed)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, chosen response) of the first ``n`` validation pairs (greedy-answer checks)."""
        return [(render_prompt(r["prompt"], self.tokenizer, self.template, self.system_prompt), r["chosen"])
                for r in self.val_records[:n]]

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_dataset, self.batch_size, self.collator(), self.num_workers, True, self.seed)

    def val_dataloader(self):
        if not self.val_dataset or len(self.val_dataset) == 0:
            return []
        size = self.eval_batch_size or self.batch_size
        return make_loader(self.val_dataset, size, self.collator(), self.num_workers, False, self.seed)


class PromptDataModule(LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_split: float = 0.1,
        format: PromptFormat = "auto",
        template: TemplateName = "chat",
        system_prompt: str | None = None,
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
            system_prompt: system prompt for rows that have none.
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
        plain_hparams(self)
        self.train_file, self.val_file, self.val_split, self.format = train_file, val_file, val_split, format
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(**(source or {}))
        self.template, self.system_prompt, self.tokenizer_name = template, system_prompt, tokenizer
        self.max_length, self.overlong, self.answer_field = max_length, overlong, answer_field
        self.dedup, self.skip_bad_rows, self.batch_size, self.eval_batch_size = dedup, skip_bad_rows, batch_size, eval_batch_size
        self.pad_to_multiple_of, self.num_workers, self.num_proc, self.seed = pad_to_multiple_of, num_workers, num_proc, seed
        self.predict_file = predict_file
        self.tokenizer = None
        self.train_dataset = self.val_dataset = self.predict_dataset = None
        self.train_report = self.val_report = None
        self.val_records: list[dict] = []

    def prepare_data(self) -> None:
        prepare_hub(self.source, self.train_file, self.val_file)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if self.predict_dataset is None:
                self.tokenizer = self.tokenizer or load_tokenizer_for(self.tokenizer_name)
                self.max_length = fit_context(self.tokenizer_name, self.max_length)
                settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                                max_length=self.max_length, overlong=self.overlong)
                self.predict_dataset = splits.prompt_split(self, settings)
            return
        if self.train_dataset is not None:
            return
        self.tokenizer = load_tokenizer_for(self.tokenizer_name)
        self.max_length = fit_context(self.tokenizer_name, self.max_length)
        check_template(self.template, self.tokenizer)
        train, self.train_report, val, self.val_report = load_splits(
            "prompt", self.train_file, self.val_file, self.val_split, self.seed, source=self.source,
            format=self.format,
            skip_bad_rows=self.skip_bad_rows, dedup=self.dedup, answer_field=self.answer_field)
        settings = dict(tokenizer=self.tokenizer, template=self.template, system_prompt=self.system_prompt,
                        max_length=self.max_length, overlong=self.overlong)
        self.train_dataset = tokenize_split(train, "prompt", self.train_report, self.train_file, self.num_proc,
                                            True, **settings)
        self.val_dataset = tokenize_split(val, "prompt", self.val_report, self.val_file or self.train_file,
                                          self.num_proc, False, **settings)
        self.val_records = val

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def predict_dataloader(self) -> DataLoader:
        return splits.predict_loader(self)

    def held_out_prompts(self, n: int) -> list[tuple[str, str]]:
        """(rendered prompt text, answer) of the first ``n`` validation records that have an answer."""
        rows = [r for r in self.val_records if r.get("answer") is not None][:n]
        return [(render_prompt(r["prompt"], self.tokenizer, self.template, self.system_prompt, r.get("input")),
                 r["answer"]) for r in rows]

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_dataset, self.batch_size, self.collator(), self.num_workers, True, self.seed)

    def val_dataloader(self):
        if not self.val_dataset or len(self.val_dataset) == 0:
            return []
        size = self.eval_batch_size or self.batch_size
        return make_loader(self.val_dataset, size, self.collator(), self.num_workers, False, self.seed)
