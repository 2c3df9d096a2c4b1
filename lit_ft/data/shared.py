"""What the three LightningDataModules share, as plain functions: reading and splitting the data, tokenizing a
split, the loaders, and the hooks that are the same in each (bound as methods: ``val_dataloader =
shared.val_dataloader``). Every name is re-exported by `lit_ft.data.modules`.
"""

from __future__ import annotations

import random

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_ft.data.checks import bound_lengths, check_context, drop_control_tokens
from lit_ft.data.readers import DataReport, SourceSpec, is_hub_name, read_rows
from lit_ft.data.records import Kind, load_records, unpair
from lit_ft.data.templates import check_template
from lit_ft.data.tokenize import tokenize_records
from lit_ft.errors import ConfigError, DataError
from lit_ft.train.resume import ResumableDataLoader


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
    mid-epoch included (`lit_ft.train.resume.ResumableDataLoader`; `lengths`: length-grouped batches). Evaluation: a
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


# ---------------------------------------------------------------------------------------------- shared hooks


def token_settings(dm: LightningDataModule) -> dict:
    """The tokenization settings every split of a datamodule uses (`tokenize_split`'s keywords)."""
    return dict(tokenizer=dm.tokenizer, template=dm.template, system_prompt=dm.system_prompt,
                max_length=dm.max_length, overlong=dm.overlong,
                tool_format=getattr(dm, "tool_format", "template"))


def inference_settings(dm: LightningDataModule) -> dict:
    """`token_settings` for a `test` or `predict` split: the tokenizer loaded unless it already is, ``max_length``
    clamped to the model's context."""
    dm.tokenizer = dm.tokenizer or load_tokenizer_for(dm.tokenizer_name)
    dm.max_length = fit_context(dm.tokenizer_name, dm.max_length)
    return token_settings(dm)


def setup_fit(dm: LightningDataModule, kind: Kind, extra: dict | None = None, **read) -> None:
    """The `fit` setup: load the tokenizer, clamp ``max_length`` to the model's context, check the template, read
    and split the data (`read`: the kind's own reading settings), keep the validation records and tokenize both
    splits (`extra`: the kind's own tokenization settings)."""
    dm.tokenizer = load_tokenizer_for(dm.tokenizer_name)
    dm.max_length = fit_context(dm.tokenizer_name, dm.max_length)
    check_template(dm.template, dm.tokenizer)
    train, dm.train_report, dm.val_records, dm.val_report = load_splits(
        kind, dm.train_file, dm.val_file, dm.val_split, dm.seed, source=dm.source, format=dm.format,
        skip_bad_rows=dm.skip_bad_rows, dedup=dm.dedup, **read)
    if kind == "unpaired":  # pairs were split into train and val whole; now each is a desirable + undesirable example
        train, dm.val_records = unpair(train, dm.train_report), unpair(dm.val_records, dm.val_report)
    settings = dict(token_settings(dm), **(extra or {}))
    dm.train_dataset = tokenize_split(train, kind, dm.train_report, dm.train_file, dm.num_proc, True, **settings)
    dm.val_dataset = tokenize_split(dm.val_records, kind, dm.val_report, dm.val_file or dm.train_file, dm.num_proc,
                                    False, **settings)


def prepare_data(dm: LightningDataModule) -> None:
    prepare_hub(dm.source, dm.train_file, dm.val_file)


def train_dataloader(dm: LightningDataModule) -> DataLoader:
    return make_loader(dm.train_dataset, dm.batch_size, dm.collator(), dm.num_workers, True, dm.seed)


def val_dataloader(dm: LightningDataModule):
    if not dm.val_dataset or len(dm.val_dataset) == 0:
        return []
    size = dm.eval_batch_size or dm.batch_size
    return make_loader(dm.val_dataset, size, dm.collator(), dm.num_workers, False, dm.seed)


def test_dataloader(dm: LightningDataModule) -> DataLoader:
    return make_loader(dm.test_dataset, dm.eval_batch_size or dm.batch_size, dm.collator(), dm.num_workers, False,
                       dm.seed)
