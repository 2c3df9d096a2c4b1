"""Issue 7: a corpus of malformed inputs (tests/fixtures/bad/), each run through the real DataModule.

Every case ends one of two ways: an error naming the file, line and field (or the setting to change), or,
with ``skip_bad_rows=True`` (or for quality filters always), a counted drop whose counts add up:
``rows_read == rows_kept + sum(dropped)``. The table below is the expected outcome of every file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lit_ft.data import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.data.tokenize import IGNORE_INDEX
from lit_ft.errors import ConfigError, DataError

BAD = Path(__file__).parent / "fixtures" / "bad"
MODULES = {"sft": InstructionDataModule, "pref": PreferenceDataModule, "prompt": PromptDataModule}


@dataclass
class Err:
    """Expect ``cls`` with a message naming ``file:line`` (when line is set), ``field 'x'`` and each of ``parts``."""

    cls: type
    line: int | None
    field: str | None
    parts: tuple[str, ...] = ()


@dataclass
class Drop:
    """Expect setup to succeed with these counts, and one warning holding all of ``warns`` (when given)."""

    read: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    warns: tuple[str, ...] = ()


def E(cls, line, fld, *parts):
    return Err(cls, line, fld, parts)


def D(read, kept, *warns, **dropped):
    return Drop(read, kept, dropped, warns)


SKIP = {"skip_bad_rows": True}
LONG = "data.max_length=48"
# (file, datamodule, extra settings, expected outcome). max_length is 48 and val_split 0 unless set here.
CASES = [
    ("invalid_json_line3.jsonl", "sft", {}, E(DataError, 3, None, "invalid JSON", "column 21")),
    ("invalid_json_line3.jsonl", "sft", SKIP, D(5, 4, invalid_json=1)),
    ("truncated_last_line.jsonl", "sft", {}, E(DataError, 5, None, "the last line is cut off", "truncated?")),
    ("truncated_last_line.jsonl", "sft", SKIP, D(5, 4, invalid_json=1)),
    ("missing_column.csv", "sft", {}, E(DataError, 1, "output", "column 'output' is missing")),
    ("missing_column.csv", "sft", SKIP, E(DataError, 1, "output", "column 'output' is missing")),
    ("ragged_row.csv", "sft", {}, E(DataError, 3, None, "3 cells but the header has 2 columns")),
    ("multiline_cell_missing_value.csv", "sft", {}, E(DataError, 4, "output", "missing; expected a string")),
    ("number_instead_of_text.jsonl", "sft", {}, E(DataError, 2, "output", "expected a string, got int")),
    ("number_instead_of_text.jsonl", "sft", SKIP, D(5, 4, malformed=1)),
    ("null_output.jsonl", "sft", {}, E(DataError, 2, "output", "missing; expected a string")),
    ("messages_not_list.jsonl", "sft", {}, E(DataError, 3, "messages", "expected a non-empty list", "got str")),
    ("messages_not_list.jsonl", "sft", SKIP, D(3, 2, malformed=1)),
    ("content_not_string.jsonl", "sft", {}, E(DataError, 2, "messages[1]", "'content': str")),
    ("content_not_string.jsonl", "sft", SKIP, D(2, 1, malformed=1)),
    ("non_utf8.jsonl", "sft", {}, E(DataError, 4, None, "not valid UTF-8", "0xe9")),
    ("non_utf8.jsonl", "sft", SKIP, D(4, 3, invalid_utf8=1)),
    ("non_utf8.csv", "sft", {}, E(DataError, 3, None, "not valid UTF-8", "0xe9")),
    ("empty.jsonl", "sft", {}, E(DataError, None, None, "no rows: the file is empty")),
    ("empty.jsonl", "sft", SKIP, E(DataError, None, None, "no rows: the file is empty")),
    ("whitespace_only.jsonl", "sft", {}, E(DataError, None, None, "no rows: the file is empty")),
    ("header_only.csv", "sft", {}, E(DataError, None, None, "header but no data rows")),
    ("empty_response.jsonl", "sft", {}, D(5, 4, empty_response=1)),
    ("whitespace_response.jsonl", "sft", {}, D(5, 4, empty_response=1)),
    # Overlong: the prompt alone is longer than max_length. truncate_prompt cuts it from the left and keeps the
    # whole response (trainable); a response that alone fills max_length would leave nothing: dropped.
    ("long_prompt.jsonl", "sft", {"overlong": "drop"}, D(5, 4, too_long=1)),
    ("long_prompt.jsonl", "sft", {"overlong": "truncate_prompt"}, D(5, 5)),
    ("long_prompt.jsonl", "sft", {"overlong": "error"}, E(DataError, 5, None, LONG, "data.overlong")),
    ("long_response.jsonl", "sft", {"overlong": "drop"}, D(5, 4, too_long=1)),
    ("long_response.jsonl", "sft", {"overlong": "truncate_prompt"}, D(5, 4, too_long=1)),
    ("long_response.jsonl", "sft", {"overlong": "error"}, E(DataError, 5, None, LONG)),
    ("long_prompt_preference.jsonl", "pref", {"overlong": "drop"}, D(5, 4, too_long=1)),
    ("long_prompt_preference.jsonl", "pref", {"overlong": "truncate_prompt"}, D(5, 5)),
    ("long_prompt_preference.jsonl", "pref", {"overlong": "error"}, E(DataError, 5, None, LONG)),
    ("long_prompt_prompts.jsonl", "prompt", {"overlong": "drop"}, D(5, 4, too_long=1)),
    ("long_prompt_prompts.jsonl", "prompt", {"overlong": "truncate_prompt"}, D(5, 5)),
    ("long_prompt_prompts.jsonl", "prompt", {"overlong": "error"}, E(DataError, 5, None, LONG)),
    ("chosen_equals_rejected.jsonl", "pref", {}, D(5, 4, chosen_equals_rejected=1)),
    ("empty_chosen.jsonl", "pref", {}, D(5, 4, empty_response=1)),
    ("missing_rejected.jsonl", "pref", {}, E(DataError, 3, "rejected", "missing; expected a string")),
    ("missing_rejected.jsonl", "pref", SKIP, D(3, 2, malformed=1)),
    ("chat_pair_prompt_differs.jsonl", "pref", {}, E(DataError, 1, "rejected", "share every message")),
    ("margin_is_string.jsonl", "pref", {}, E(DataError, 2, "margin", "expected a number or null, got str")),
    ("nan_margin.jsonl", "pref", {}, E(DataError, 2, "margin", "not finite")),
    ("nan_margin.jsonl", "pref", SKIP, D(2, 1, malformed=1)),
    ("hh_no_marker.jsonl", "pref", {}, E(DataError, 3, "chosen", r"'\n\nAssistant:'")),
    ("hh_no_marker.jsonl", "pref", SKIP, D(3, 2, malformed=1)),
    ("bad_role.jsonl", "sft", {}, E(DataError, 2, "messages[0]", "'role': one of", "'human'")),
    ("bad_role.jsonl", "sft", SKIP, D(2, 1, malformed=1)),
    ("wrong_order.jsonl", "sft", {}, E(DataError, 3, "messages[1].role", "expected 'assistant'")),
    ("last_not_assistant.jsonl", "sft", {}, E(DataError, 2, "messages[2].role", "last message to be 'assistant'")),
    ("system_in_middle.jsonl", "sft", {}, E(DataError, 2, "messages[1].role", "system message")),
    ("top_level_number.json", "sft", {}, E(DataError, 1, None, "expected a JSON object per line, got int")),
    ("top_level_number.json", "sft", SKIP, E(DataError, None, None, "no rows left to train on", "invalid_json: 1")),
    ("top_level_string.json", "sft", {}, E(DataError, 1, None, "expected a JSON object per line, got str")),
    ("array_of_numbers.json", "sft", {}, E(DataError, 1, None, "expected a JSON object, got int")),
    ("top_level_object.json", "sft", {}, E(DataError, 1, None, "cannot detect the instruction format", "data.format")),
    ("truncated_array.json", "sft", {}, E(DataError, 6, None, "invalid JSON")),
    ("unknown_shape.jsonl", "sft", {}, E(DataError, 1, None, "['text']", "data.format")),
    ("wrong_extension.txt", "sft", {}, E(ConfigError, None, None, "data.train_file", "unsupported file type '.txt'")),
    ("duplicate_rows.jsonl", "sft", {}, D(6, 4, duplicate=2)),
    ("duplicate_rows.jsonl", "sft", {"dedup": False}, D(6, 6)),
    ("low_score.jsonl", "sft", {"score_field": "score", "min_score": 0.5}, D(4, 2, low_score=2)),
    ("nan_score.jsonl", "sft", {"score_field": "score", "min_score": 0.5}, E(DataError, 2, "score", "not finite")),
    ("nan_score.jsonl", "sft", {"score_field": "score", "min_score": 0.5, **SKIP}, D(2, 1, malformed=1)),
    ("answer_is_object.jsonl", "prompt", {}, E(DataError, 1, "answer", "expected a string or number, got dict")),
    ("empty_prompt.jsonl", "prompt", {}, D(4, 3, empty_prompt=1)),
    ("mixed_bad_rows.jsonl", "sft", {}, E(DataError, 3, None, "invalid JSON")),
    ("mixed_bad_rows.jsonl", "sft", SKIP,
     D(8, 3, duplicate=1, empty_response=1, invalid_json=1, invalid_utf8=1, malformed=1)),
    # Decided: a column with an empty header (a trailing comma, an unnamed index column) is ignored, and CSV
    # cells stay text ("2" is a valid answer, not an int).
    ("extra_unnamed_column.csv", "sft", {}, D(3, 3)),
    ("bom.jsonl", "sft", {}, D(4, 4)),
    ("bom.json", "sft", {}, D(4, 4)),
    ("bom.csv", "sft", {}, D(2, 2)),
    # Not a file in the folder: where the config points at nothing.
    ("does_not_exist.jsonl", "sft", {}, E(ConfigError, None, None, "data.train_file: file not found")),
    ("someone/some-data", "sft", {}, E(ConfigError, None, None, "data.train_file", "someone/some-data",
                                       "pass a local file")),
]


def _id(case) -> str:
    name, kind, kw, _ = case
    return f"{kind}-{name}" + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """HF_HUB_OFFLINE=1 is set in conftest; raise what datasets raises then, without its seconds of start-up."""
    import datasets

    def offline(name, *a, **k):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def _source(name: str) -> str:
    return name if "/" in name else str(BAD / name)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bad_input(case, tiny_model_dir, caplog):
    name, kind, kw, expected = case
    check_case(_source(name), kind, kw, expected, tiny_model_dir, caplog)


def check_case(source: str, kind: str, kw: dict, expected, tokenizer: str, caplog=None):
    """Run one corpus case through its DataModule's setup and compare with the expected outcome."""
    settings = {"tokenizer": tokenizer, "val_split": 0.0, "max_length": 48, "batch_size": 2} | kw
    dm = MODULES[kind](train_file=source, **settings)
    if isinstance(expected, Err):
        with pytest.raises(expected.cls) as info:
            dm.setup("fit")
        assert type(info.value) is expected.cls, info.value
        message = str(info.value)
        hub = "/" in source and not Path(source).exists() and not source.startswith("/")
        where = source if hub else Path(source).name + (f":{expected.line}" if expected.line else "")
        assert where in message, message
        if expected.field:
            assert f"field '{expected.field}'" in message, message
            assert info.value.field == expected.field and info.value.line == expected.line
        for part in expected.parts:
            assert part in message, message
        return None
    if caplog is not None:
        caplog.clear()
    dm.setup("fit")
    report = dm.train_report
    assert (report.rows_read, report.rows_kept, report.dropped) == (expected.read, expected.kept, expected.dropped)
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    assert len(dm.train_dataset) == report.rows_kept
    if expected.warns:
        hits = [r.getMessage() for r in caplog.records if all(p in r.getMessage() for p in expected.warns)]
        assert len(hits) == 1, [r.getMessage() for r in caplog.records]
    next(iter(dm.train_dataloader()))  # what was kept collates
    return dm


def test_truncated_prompt_keeps_a_trainable_response_with_eos(tiny_model_dir):
    dm = InstructionDataModule(train_file=str(BAD / "long_prompt.jsonl"), tokenizer=tiny_model_dir, val_split=0.0,
                               max_length=48, overlong="truncate_prompt")
    dm.setup("fit")
    eos = dm.tokenizer.eos_token_id
    for row in dm.train_dataset:
        assert len(row["input_ids"]) <= 48
        trained = [t for t in row["labels"][1:] if t != IGNORE_INDEX]
        assert trained and eos in trained
    longest = max(dm.train_dataset, key=lambda r: len(r["input_ids"]))
    assert len(longest["input_ids"]) == 48 and dm.tokenizer.decode(longest["input_ids"]).endswith("Done.<|im_end|>\n")


def test_csv_cells_stay_text(tiny_model_dir):
    dm = InstructionDataModule(train_file=str(BAD / "extra_unnamed_column.csv"), tokenizer=tiny_model_dir,
                               val_split=0.0, template="plain")
    dm.setup("fit")
    text = dm.tokenizer.decode(dm.train_dataset[0]["input_ids"])
    assert text == "What is 1 plus 1?2<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer_variants(tiny_model_dir, tmp_path_factory):
    """Copies of the tiny tokenizer: without a pad token, and with neither pad nor EOS."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for variant, drop in (("no_pad", ("pad_token",)), ("no_pad_no_eos", ("pad_token", "eos_token"))):
        d = root / variant
        shutil.copytree(tiny_model_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        for key in drop:
            cfg[key] = None
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        out[variant] = str(d)
    return out


def test_missing_pad_token_pads_with_eos_and_keeps_eos_labels(tokenizer_variants):
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=tokenizer_variants["no_pad"],
                               val_split=0.0, batch_size=4, template="alpaca")
    dm.setup("fit")
    tok = dm.tokenizer
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    _assert_eos_survives(dm)


def test_pad_equals_eos_keeps_the_eos_label(tiny_model_dir):
    """pad == EOS (SmolLM2): the padding is masked, but the EOS ending each response stays a label."""
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=tiny_model_dir, val_split=0.0,
                               batch_size=4)
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    _assert_eos_survives(dm)


def _assert_eos_survives(dm):
    eos = dm.tokenizer.eos_token_id
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "rows of one length do not test padding"
    for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths):
        trained = labels[:n][labels[:n] != IGNORE_INDEX].tolist()
        assert eos in trained  # the response's EOS is learned ...
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == eos).all()  # ... its pad copies are not


def test_tokenizer_without_pad_or_eos_is_refused(tokenizer_variants):
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=tokenizer_variants["no_pad_no_eos"])
    with pytest.raises(ConfigError, match="neither a pad nor an EOS token"):
        dm.setup("fit")


def test_val_file_not_found_names_its_setting(tiny_model_dir):
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), val_file=str(BAD / "nope.jsonl"),
                               tokenizer=tiny_model_dir)
    with pytest.raises(ConfigError, match=r"data.val_file: file not found: .*nope.jsonl"):
        dm.setup("fit")
