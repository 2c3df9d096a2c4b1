"""Reading, validating, normalising and filtering rows (lit_ft.data.records)."""

from __future__ import annotations

import json

import pytest

from lit_ft.data.readers import read_rows
from lit_ft.data.hh import split_hh
from lit_ft.data.records import load_records
from lit_ft.errors import ConfigError, DataError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def balanced(report) -> bool:
    return report.rows_read == report.rows_kept + sum(report.dropped.values())


# ------------------------------------------------------------------------------------------------ shapes


def test_alpaca_with_and_without_input(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "3 and 4", "output": "7"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])
    records, report = load_records(f, "instruction")
    assert records[0]["messages"] == [{"role": "user", "content": "Add"}, {"role": "assistant", "content": "7"}]
    assert records[0]["input"] == "3 and 4" and records[1]["input"] is None
    assert [r["line"] for r in records] == [1, 2]
    assert report.rows_read == 2 and report.rows_kept == 2


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"question": "p", "answer": "c"}, "question_answer"),
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}, "messages"),
])
def test_instruction_shapes_auto_and_named(tmp_path, row, fmt):
    f = write_jsonl(tmp_path / "x.jsonl", [row])
    for format in ("auto", fmt):
        (rec,), _ = load_records(f, "instruction", format=format)
        assert rec["messages"][-1] == {"role": "assistant", "content": "c"}
        assert rec["messages"][0] == {"role": "user", "content": "p"}


def test_json_array_keeps_line_numbers(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": 5}\n]\n')
    with pytest.raises(DataError) as e:
        load_records(str(f), "instruction")
    assert e.value.line == 3 and e.value.field == "completion"
    assert "a.json:3: field 'completion': expected a string, got int" in str(e.value)


def test_csv_and_parquet(tmp_path):
    import datasets

    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\nhello,world\nfoo,\n")
    with pytest.raises(DataError) as e:
        load_records(str(csv), "instruction")
    assert e.value.line == 3 and e.value.field == "completion" and "d.csv:3" in str(e.value)
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 2).to_parquet(str(tmp_path / "d.parquet"))
    records, report = load_records(str(tmp_path / "d.parquet"), "instruction")
    assert len(records) == 1 and report.dropped == {"duplicate": 1} and records[0]["line"] == 1


def test_missing_column_names_file_and_column(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,answer\nhello,world\n")
    with pytest.raises(DataError) as e:
        load_records(str(csv), "instruction", format="alpaca")
    assert e.value.field == "output" and "d.csv" in str(e.value) and "column 'output' is missing" in str(e.value)


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("content, line, part", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion"}\n', 2, "invalid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl', 2, "the last line is cut off"),
    (b'{"prompt": "a", "completion": "b"}\n\n[1, 2]\n', 3, "expected a JSON object per line, got list"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', 2, "not valid UTF-8"),
])
def test_bad_json_lines_name_the_line(tmp_path, content, line, part):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_rows(str(f))
    assert e.value.line == line and f"bad.jsonl:{line}" in str(e.value) and part in str(e.value)


def test_bad_lines_skipped_and_counted(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{oops\n\xff\n{"prompt": "a", "completion": 3}\n')
    records, report = load_records(str(f), "instruction", skip_bad_rows=True)
    assert len(records) == 1
    assert report.dropped == {"invalid_json": 1, "invalid_utf8": 1, "malformed": 1}
    assert report.rows_read == 4 and balanced(report)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        read_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match=r"data.val_file: file not found: .*nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"), setting="data.val_file")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported file type '.txt'"):
        read_rows(str(tmp_path / "x.txt"))


def test_hub_name_offline_says_pass_a_local_file(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"hub dataset 'someone/some-data' could not be reached.*local file"):
        read_rows("someone/some-data")


@pytest.mark.parametrize("row, field, part", [
    ({"instruction": "a", "output": 3}, "output", "expected a string, got int"),
    ({"instruction": "a"}, "output", "missing"),
    ({"messages": "hi"}, "messages", "expected a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "expected 'user'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "messages[1].role",
     "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages[0].role", "last message to be 'assistant'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]", "'role': one of"),
    ({"messages": [{"role": "user", "content": 1}]}, "messages[0]", "'content': str"),
])
def test_malformed_rows_name_file_line_field(tmp_path, row, field, part):
    f = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "ok", "output": "ok"} if "instruction" in row else
                                           {"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}, row])
    with pytest.raises(DataError) as e:
        load_records(f, "instruction")
    assert (e.value.file, e.value.line, e.value.field) == (f, 2, field)
    assert f"m.jsonl:2: field '{field}'" in str(e.value) and part in str(e.value)


def test_unknown_and_undetectable_format(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"u.jsonl:1: cannot detect the instruction format .*\['text'\].*data.format"):
        load_records(f, "instruction")
    with pytest.raises(ConfigError, match="data.format: unknown instruction format 'sharegpt'"):
        load_records(f, "instruction", format="sharegpt")


# ------------------------------------------------------------------------------------------------ filters


def test_quality_filters_count_every_drop(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b", "score": 5},
        {"prompt": "a", "completion": "b", "score": 5},  # duplicate
        {"prompt": "a", "completion": "  \n", "score": 5},  # empty response
        {"prompt": "c", "completion": "d", "score": 1},  # low score
        {"prompt": "e", "completion": "f", "score": 3},
    ]
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    records, report = load_records(f, "instruction", score_field="score", min_score=3)
    assert [r["line"] for r in records] == [1, 5]
    assert report.dropped == {"duplicate": 1, "empty_response": 1, "low_score": 1}
    assert report.rows_read == 5 and report.rows_kept == 2 and balanced(report)
    assert "read 5 rows, kept 2, dropped 3 (duplicate: 1, empty_response: 1, low_score: 1)" in report.summary()
    records, report = load_records(f, "instruction", dedup=False)
    assert len(records) == 4 and report.dropped == {"empty_response": 1}


def test_score_field_must_be_numeric(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b", "score": "high"}])
    with pytest.raises(DataError, match=r"s.jsonl:1: field 'score': expected a number"):
        load_records(f, "instruction", score_field="score", min_score=1.0)


# ------------------------------------------------------------------------------------------------ preference


def test_preference_strings_and_filters(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "good", "rejected": " "},
        {"prompt": "q2", "chosen": "good", "rejected": "bad"},
    ])
    records, report = load_records(f, "preference")
    assert records[0] == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad",
                          "margin": 2.0, "line": 1}
    assert records[1]["margin"] is None
    assert report.dropped == {"chosen_equals_rejected": 1, "empty_response": 1} and balanced(report)


def test_preference_chat_lists_share_the_prompt(tmp_path):
    sys_user = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"chosen": sys_user + [{"role": "assistant", "content": "hello!"}],
         "rejected": sys_user + [{"role": "assistant", "content": "go away"}]},
        {"chosen": sys_user + [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
    ])
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'rejected': chosen and rejected must share"):
        load_records(f, "preference")
    records, report = load_records(f, "preference", skip_bad_rows=True)
    assert records[0]["prompt"] == sys_user and records[0]["chosen"] == "hello!" and records[0]["rejected"] == "go away"
    assert report.dropped == {"malformed": 1}


def test_hh_rlhf_prefix_split(tmp_path):
    common = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: add 2 and 2\n\nAssistant:"
    prompt, c, r = split_hh(common + " 4", common + " 5, I think")
    assert (prompt, c, r) == (common, " 4", " 5, I think")
    # The shared prefix may run past the marker ("The answer is ..."): cut at the last marker inside it.
    prompt, c, r = split_hh(common + " The answer is 4", common + " The answer is 5")
    assert prompt == common and c == " The answer is 4"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": common + " 4", "rejected": common + " 5"},
                                             {"chosen": "no markers", "rejected": "at all"}])
    with pytest.raises(DataError, match=r"hh.jsonl:2: field 'chosen': no shared prefix ending in"):
        load_records(f, "preference")
    records, _ = load_records(f, "preference", format="hh", skip_bad_rows=True)
    assert records[0]["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "add 2 and 2"}]
    assert records[0]["transcript"] == common


def test_hh_rows_are_turns_for_the_chat_template_and_the_text_as_written_for_the_text_ones(tmp_path):
    """A user expects an HH conversation rendered by the chat template as its turns (not one user message holding
    the raw transcript); the plain template keeps the text as written, the only place the speakers are named."""
    from lit_ft.data.hh import prompt_for

    common = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: and\n\nHuman: add 2 and 2\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": common + " 4", "rejected": common + " 5"}])
    record = load_records(f, "preference")[0][0]
    assert prompt_for(record, "chat") == [{"role": "user", "content": "hi there"},
                                          {"role": "assistant", "content": "hello"},
                                          {"role": "user", "content": "and\n\nadd 2 and 2"}]
    assert prompt_for(record, "plain") == [{"role": "user", "content": common}]
    prompts = load_records(f, "prompt")[0]
    assert prompt_for(prompts[0], "chat")[-1]["content"] == "and\n\nadd 2 and 2"
    assert prompt_for(prompts[0], "plain")[0]["content"].endswith("\n\nAssistant:")
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"chosen": "Say hi\n\nAssistant: hi",
                                                  "rejected": "Say hi\n\nAssistant: no"}])
    assert load_records(bare, "preference")[0][0]["prompt"] == [{"role": "user", "content": "Say hi"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "\n\nHuman: x\n\nAssistant: a\n\nAssistant: b",
                                                "rejected": "\n\nHuman: x\n\nAssistant: a\n\nAssistant: c"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'chosen': expected HH-RLHF turns .* 'Human:' turn right"):
        load_records(bad, "preference")


def test_bad_margin(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'margin': expected a number or null"):
        load_records(f, "preference")


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_records_from_each_shape(tmp_path):
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    cases = [
        ({"prompt": "q1", "answer": 42}, [{"role": "user", "content": "q1"}], "42"),
        ({"instruction": "q1", "input": "ctx"}, [{"role": "user", "content": "q1"}], None),
        ({"messages": msgs, "answer": "x"}, msgs[:1], "x"),
        ({"question": "q1", "answer": "#### 7"}, [{"role": "user", "content": "q1"}], "#### 7"),
        ({"prompt": "q1", "chosen": "a", "rejected": "b"}, [{"role": "user", "content": "q1"}], None),
        ({"chosen": msgs, "rejected": msgs[:1] + [{"role": "assistant", "content": "z"}]}, msgs[:1], None),
    ]
    for i, (row, prompt, answer) in enumerate(cases):
        f = write_jsonl(tmp_path / f"p{i}.jsonl", [row])
        (rec,), _ = load_records(f, "prompt")
        assert rec["prompt"] == prompt and rec["answer"] == answer, row
    (rec,), _ = load_records(write_jsonl(tmp_path / "i.jsonl", [cases[1][0]]), "prompt")
    assert rec["input"] == "ctx"
    (rec,), _ = load_records(write_jsonl(tmp_path / "n.jsonl", [cases[0][0]]), "prompt", answer_field=None)
    assert rec["answer"] is None
