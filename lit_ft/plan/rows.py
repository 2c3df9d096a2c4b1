"""The rows a plan is made for: the real data's longest rows when the DataModule's files are local, else
`max_length` (the worst case).

`row_stats(datamodule)` tokenizes the training and validation files exactly as the fit will, through the
DataModule's own public `setup("fit")` on a copy of it (the template, the tokenizer, the overlong rule and the
dropped rows all as in the fit; the DataModule the caller holds is left untouched), and keeps what the activation
terms depend on (`RowStats`). A DataModule already set up (`MemoryPlanLog` plans after Lightning's setup) is read
as it is. Hub datasets are not read (that would download), and neither is a file that cannot be opened or
tokenized: the plan then says so and takes every row at `max_length`. Files over `SCAN_BYTES` are scanned over
their first `SCAN_ROWS` lines when they are JSON Lines (and not at all otherwise), and the plan says so: the longest
row of a sample is a lower bound of the file's longest.

Why the longest row and not an average: the collators pad a micro-batch to its longest row (`SFTCollator`,
`PreferenceCollator`; `PromptCollator` left-pads prompts), so every batch the longest row lands in has that many
token slots in every row, and shuffling puts it into some batch of every epoch. The padded shape B x longest is
therefore the worst micro-batch, reached once an epoch, and sets the peak of the trunk's activations. The loss
terms depend on the trained tokens instead (completion-only labels), which no batch has more of than the B rows
with the most labels together (`label_counts`). A packed batch (`PackedSFTCollator`) holds its B sequences packed
first-fit decreasing into rows of `max_length`: the most tokens come from the B longest rows (`packed_shape`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCAN_BYTES = 64 * 2**20
"""Files up to this size are read whole (the 2000-row demo files take about a second to tokenize)."""
SCAN_ROWS = 20_000
"""Lines of a larger JSON Lines file that are scanned (about ten seconds of tokenizing on one core)."""
TOP = 1024
"""Rows kept of the sorted lengths and label counts: enough for any micro-batch a plan or its advice looks at."""


@dataclass(frozen=True)
class RowStats:
    """The training rows' lengths as the plan uses them (tokens, after the DataModule's template and rules)."""

    longest: int
    """Longest training row (a pair: its longer side, prompt included; prompts: the prompt), rounded up to
    `pad_to_multiple_of`: the padded length of the worst micro-batch."""
    eval_longest: int | None
    """Longest validation row, rounded the same way (None: no validation rows were read)."""
    label_counts: tuple[int, ...] = ()
    """Trained tokens of each sequence (a pair: each side's response), largest first (the first `TOP`)."""
    lengths: tuple[int, ...] = ()
    """Sequence lengths, longest first (the first `TOP`): what packing packs."""
    padded: bool = True
    """Rows differ in length, so a batch carries padding and an attention mask reaches the attention (False: all
    rows equally long, transformers drops an all-ones mask)."""
    note: str = ""
    """How the rows were found, for the plan's table."""
    multiple: int | None = None
    """The DataModule's `pad_to_multiple_of` (packed rows are rounded up to it too)."""
    kind: str = "row"
    """What a length is of: `row` (SFT), `pair side` (reward, DPO) or `prompt` (PPO, GRPO)."""
    mismatched: int | None = None
    """KTO's unpaired rows: the longest prompt plus the longest completion of the training rows, the most a
    mismatched pair of `UnpairedCollator` can hold before it cuts the prompt to `max_length` (None: other rows)."""
    eval_mismatched: int | None = None
    """The same of the validation rows."""
    units: tuple[int, ...] = ()
    """Pairs: each pair's prompt + chosen + rejected response (the length of a shared-prompt row,
    `data.share_prompt`), longest first (the first `TOP`)."""
    count: int = 0
    """Training plus validation rows read (KTO's precomputed reference table holds one entry each)."""
    train_count: int = 0
    """Training rows read (a lower bound where the scan was capped): what an epoch's steps are planned from."""


def _round(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _kind(ds) -> str:
    cols = set(ds.column_names)
    if "chosen_input_ids" in cols:
        return "pairs"
    return "labelled" if "labels" in cols else "prompts"


def _sequences(ds) -> tuple[list[int], list[int]]:
    """(lengths, trained tokens) of every sequence a dataset feeds the model. SFT rows: the shifted labels that are
    not -100 (what `losses.causal_lm_loss` keeps); pairs: each side, its response after the shared prompt
    (DPO's log-probs); prompts: the prompt, nothing trained on it."""
    kind = _kind(ds)
    if kind == "pairs":
        lens, labels = [], []
        for c, r, p in zip(ds["chosen_input_ids"], ds["rejected_input_ids"], ds["prompt_length"]):
            lens += [len(c), len(r)]
            labels += [len(c) - p, len(r) - p]
        return lens, labels
    if kind == "labelled":
        return [len(x) for x in ds["input_ids"]], [sum(t != -100 for t in y[1:]) for y in ds["labels"]]
    return [len(x) for x in ds["input_ids"]], []


def _units(ds) -> list[int]:
    """Pairs' shared-prompt row lengths (prompt once, both responses); [] for other rows."""
    if _kind(ds) != "pairs":
        return []
    return [len(c) + len(r) - p for c, r, p in zip(ds["chosen_input_ids"], ds["rejected_input_ids"],
                                                     ds["prompt_length"])]


def _mismatched(ds) -> int | None:
    """The longest prompt + the longest completion of unpaired rows (KTO's; None: other rows or none)."""
    if ds is None or not len(ds) or not {"prompt_length", "label"} <= set(ds.column_names):
        return None
    prompts = ds["prompt_length"]
    return max(prompts) + max(len(x) - k for x, k in zip(ds["input_ids"], prompts))


def stats_of(train, val, pad_to_multiple_of: int | None, note: str) -> RowStats:
    """`RowStats` of tokenized train and validation datasets (as the DataModules hold them)."""
    lens, labels = _sequences(train)
    if not lens:
        raise ValueError("no training rows")
    # a pair's two sides share one padded batch (chosen rows, then rejected rows): its longest side sets the width
    longest = _round(max(lens), pad_to_multiple_of)
    eval_longest = None
    if val is not None and len(val):
        eval_longest = _round(max(_sequences(val)[0]), pad_to_multiple_of)
    return RowStats(longest, eval_longest, tuple(sorted(labels, reverse=True)[:TOP]),
                    tuple(sorted(lens, reverse=True)[:TOP]), padded=len(set(lens)) > 1,
                    note=note, multiple=pad_to_multiple_of,
                    kind={"pairs": "pair side", "prompts": "prompt"}.get(_kind(train), "row"),
                    mismatched=_mismatched(train), eval_mismatched=_mismatched(val),
                    units=tuple(sorted(_units(train), reverse=True)[:TOP]),
                    count=len(train) + (len(val) if val is not None else 0), train_count=len(train))


def first_fit_decreasing(lengths, capacity: int) -> list[int]:
    """Token counts of the rows `PackedSFTCollator` / `PackedPreferenceCollator` pack `lengths` into (longest
    first, each into the first row with room)."""
    room: list[int] = []
    for n in sorted(lengths, reverse=True):
        i = next((i for i, free in enumerate(room) if n <= free), None)
        if i is None:
            room.append(capacity - n)
        else:
            room[i] -= n
    return [capacity - free for free in room]


def _head(path: Path, rows: int, where: str, split: str) -> str:
    """The first `rows` lines of a JSON Lines file, copied into `where` (as `<split>_<name>`: a train and a
    validation file of one name do not collide)."""
    out = Path(where) / f"{split}_{path.name}"
    with path.open("rb") as src, out.open("wb") as dst:
        for i, line in enumerate(src):
            if i >= rows:
                break
            dst.write(line)
    return str(out)


@contextlib.contextmanager
def _quiet():
    """No tokenizing progress bars in a plan's output."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _local(source: str | None):
    """(path, why not) of a data setting: a readable local file, or the reason it is not read."""
    from lit_ft.data.readers import is_hub_name
    from lit_ft.data.recipes import resolve_source

    if not source:
        return None, None
    try:
        resolved = resolve_source(source)
    except Exception as e:  # a bad `demo:` name: the fit reports it; the plan falls back
        return None, f"{source}: {e}"
    if is_hub_name(resolved):
        return None, f"{source} is a hub dataset (not read by the plan)"
    path = Path(resolved).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        return None, f"{source} cannot be read as a file"
    return path, None


def row_stats(dm) -> tuple[RowStats | None, str]:
    """(the rows' stats or None, what the plan's rows are) for a DataModule (any object with the lit_ft
    DataModules' `train_file`, `setup` and datasets; anything else: None)."""
    if dm is None:
        return None, "no DataModule: every row max_length"
    pad = getattr(dm, "pad_to_multiple_of", None)
    if getattr(dm, "train_dataset", None) is not None:  # already set up (the fit's own rows)
        try:
            st = stats_of(dm.train_dataset, getattr(dm, "val_dataset", None), pad, "")
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            return None, f"training rows not readable ({type(e).__name__}): every row max_length"
        return _with_note(st, f"of {len(dm.train_dataset)} rows", dm), ""
    if not hasattr(dm, "train_file") or not callable(getattr(dm, "setup", None)):
        return None, f"{type(dm).__name__} has no local training file: every row max_length"
    train, why = _local(dm.train_file)
    if train is None:
        return None, f"{why}: every row max_length"
    val, _ = _local(getattr(dm, "val_file", None))
    with tempfile.TemporaryDirectory() as tmp:
        probe = copy.copy(dm)  # the caller's DataModule is not set up by a plan
        for name in ("train_dataset", "val_dataset", "test_dataset", "predict_dataset"):
            if hasattr(probe, name):
                setattr(probe, name, None)
        where = "of {n} rows"
        if train.stat().st_size > SCAN_BYTES:
            if train.suffix.lower() != ".jsonl":
                return None, (f"{dm.train_file} is {train.stat().st_size / 2**20:.0f} MiB (only JSON Lines files "
                              f"that large are sampled): every row max_length")
            probe.train_file = _head(train, SCAN_ROWS, tmp, "train")
            where = f"of the first {{n}} rows of {train.name} (scan capped at {SCAN_ROWS} lines: a lower bound)"
        if getattr(dm, "val_file", None):
            if val is None or val.stat().st_size > SCAN_BYTES:  # sampled as the training file, or not read
                sample = val is not None and val.suffix.lower() == ".jsonl"
                probe.val_file = _head(val, SCAN_ROWS, tmp, "val") if sample else None
                if probe.val_file is None:
                    probe.val_split = 0.0
        try:
            with _quiet():
                probe.setup("fit")
            st = stats_of(probe.train_dataset, probe.val_dataset, pad, "")
        except Exception as e:  # the fit reports bad data with its own error; the plan only falls back
            return None, f"{dm.train_file} not tokenized ({type(e).__name__}: {str(e)[:120]}): every row max_length"
        return _with_note(st, where.format(n=len(probe.train_dataset)), dm), ""


def _with_note(st: RowStats, where: str, dm) -> RowStats:
    from dataclasses import replace

    ev = f", validation {st.eval_longest}" if st.eval_longest is not None else ""
    return replace(st, note=f"longest real {st.kind} {st.longest} tokens {where}{ev} (max_length "
                            f"{getattr(dm, 'max_length', '?')})")


# ---------------------------------------------------------------------------------------------- shapes planned


def seq_len(s) -> int:
    """The padded length of the worst training micro-batch: the longest real row, or `max_length`."""
    return s.data.longest if s.data is not None else s.max_length


def eval_seq_len(s) -> int:
    """The longest validation row (`max_length` when none was read)."""
    return s.data.eval_longest or s.max_length if s.data is not None else s.max_length


def mismatched_len(s, validation: bool = False) -> int:
    """The padded length of KTO's worst micro-batch of mismatched pairs (`UnpairedCollator`: each prompt followed
    by another row's completion, the prompt cut from the left to fit `max_length`): the longest prompt plus the
    longest completion, at most `max_length`; without data (or without that split's rows) `max_length`."""
    n = None if s.data is None else s.data.eval_mismatched if validation else s.data.mismatched
    return s.max_length if n is None else _round(min(n, s.max_length), s.data.multiple)


def loss_tokens(s, seqs: int, length: int) -> int:
    """Trained tokens of a micro-batch of `seqs` sequences of `length`: at most every position after the first
    (`max_length` planning), with real rows at most the `seqs` largest label counts together."""
    full = seqs * (length - 1)
    if s.data is None or not s.data.label_counts:
        return full
    return min(full, sum(s.data.label_counts[:seqs]))


def padded(s, rows: int) -> bool:
    """An attention mask reaches the attention: rows of different lengths in one batch (without data: any batch
    of more than one row)."""
    return rows > 1 and (s.data is None or s.data.padded)


def packed_shape(s, seqs: int) -> tuple[int, int]:
    """(rows, length) of a packed micro-batch of `seqs` sequences: without data `seqs` rows of `max_length`
    (every sequence fills a row); with data the `seqs` longest sequences packed first-fit decreasing into rows of
    `max_length`, each padded to the longest packed row, as the packing collators do."""
    if s.data is None or not s.data.lengths:
        return seqs, s.max_length
    rows = first_fit_decreasing(s.data.lengths[:seqs], s.max_length)
    return len(rows), _round(max(rows), s.data.multiple)


SHARING_STAGES = ("dpo", "reward")
"""The stages that read shared-prompt rows (`data.share_prompt`)."""


def shares_prompt(s) -> bool:
    """The run's preference pairs come as one row each, the prompt once (`data.share_prompt` on a stage that reads
    them)."""
    return s.share_prompt and s.stage in SHARING_STAGES


def shared_shape(s, pairs: int) -> tuple[int, int]:
    """(rows, length) of a shared-prompt micro-batch of `pairs` pairs (`SharedPromptCollator`: each pair one row of
    its prompt and both responses): one row a pair padded to the longest, or packed first-fit decreasing into rows
    of 2 x `max_length`; without data every pair 2 x `max_length` tokens."""
    cap = 2 * s.max_length
    if s.data is None or not s.data.units:
        return pairs, cap
    if not s.packing:
        return pairs, _round(s.data.units[0], s.data.multiple)
    rows = first_fit_decreasing(s.data.units[:pairs], cap)
    return len(rows), _round(max(rows), s.data.multiple)
