"""The LightningDataModules end to end on the tiny tokenizer (no CLI, no network)."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.data import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.data.tokenize import IGNORE_INDEX
from lit_ft.errors import ConfigError, DataError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def balanced(report) -> bool:
    return report.rows_read == report.rows_kept + sum(report.dropped.values())


@pytest.fixture
def sft_file(tmp_path):
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"The answer is {2 * i}."} for i in range(20)]
    rows += [rows[0], {"instruction": "empty", "output": " "}]  # one duplicate, one empty response
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_instruction_end_to_end(tiny_model_dir, tiny_tokenizer, sft_file):
    dm = InstructionDataModule(train_file=sft_file, tokenizer=tiny_model_dir, batch_size=4, val_split=0.25)
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].dtype == torch.long
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padded
        assert (labels[n:] == IGNORE_INDEX).all() and labels[0] == IGNORE_INDEX
        assert tiny_tokenizer.eos_token_id in labels[:n].tolist()  # the response's EOS is trained
    tr, va = dm.train_report, dm.val_report
    assert tr.dropped == {"duplicate": 1, "empty_response": 1} and balanced(tr) and balanced(va)
    assert tr.rows_read + va.rows_read == 22 and va.rows_kept == 5 and len(dm.val_dataset) == 5
    assert tr.rows_kept == len(dm.train_dataset) == 15
    prompt, reference = dm.held_out_prompts(2)[0]
    assert prompt.endswith("<|im_start|>assistant\n") and reference.startswith("The answer is")
    assert len(dm.held_out_prompts(100)) == 5


def test_shuffling_is_seeded_and_val_is_ordered(tiny_model_dir, sft_file):
    def first_batches(seed):
        dm = InstructionDataModule(train_file=sft_file, tokenizer=tiny_model_dir, batch_size=4, seed=seed)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))["input_ids"]

    dm, a = first_batches(0)
    _, b = first_batches(0)
    _, c = first_batches(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    v1 = [x["input_ids"] for x in dm.val_dataloader()]
    v2 = [x["input_ids"] for x in dm.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(v1, v2))
    dm.setup("validate")  # idempotent
    assert dm.train_report.rows_read + dm.val_report.rows_read == 22


def test_val_file_packing_and_full_labels(tiny_model_dir, tmp_path, sft_file):
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "hi", "completion": "hello"}])
    dm = InstructionDataModule(train_file=sft_file, val_file=val, tokenizer=tiny_model_dir, template="alpaca",
                               packing=True, max_length=128, batch_size=4, completion_only=False)
    dm.setup("fit")
    assert dm.val_report.rows_read == 1 and dm.train_report.rows_kept == 20
    batch = next(iter(dm.train_dataloader()))
    assert {"position_ids", "seq_lens"} <= set(batch) and batch["input_ids"].shape[1] <= 128
    assert int(batch["seq_lens"].sum()) <= batch["input_ids"].numel() and len(batch["seq_lens"]) == 4
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    assert batch["labels"][~starts & (batch["labels"] != IGNORE_INDEX)].numel() > 0
    (vb,) = list(dm.val_dataloader())
    assert vb["input_ids"].shape[0] == 1


def test_overlong_error_and_nothing_left(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "completion": "fox " * 50}] * 1
                    + [{"prompt": "q2", "completion": "dog " * 60}])
    dm = InstructionDataModule(train_file=f, tokenizer=tiny_model_dir, max_length=16, overlong="error", val_split=0)
    with pytest.raises(DataError, match=r"long.jsonl:1: \d+ tokens exceed data.max_length=16"):
        dm.setup("fit")
    dm = InstructionDataModule(train_file=f, tokenizer=tiny_model_dir, max_length=16, val_split=0)
    with pytest.raises(DataError, match=r"no rows left to train on: .*too_long: 2"):
        dm.setup("fit")


def test_template_without_chat_template_refused(tmp_path, tiny_model_dir, sft_file):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, d)
    for name in ("tokenizer_config.json",):
        cfg = json.loads((d / name).read_text())
        cfg.pop("chat_template", None)
        (d / name).write_text(json.dumps(cfg))
    for extra in d.glob("chat_template.*"):
        extra.unlink()
    dm = InstructionDataModule(train_file=sft_file, tokenizer=str(d))
    with pytest.raises(ConfigError, match="data.template='chat'"):
        dm.setup("fit")


def test_preference_end_to_end(tiny_model_dir, tmp_path):
    common = "\n\nHuman: what is {i} plus {i}?\n\nAssistant:"
    rows = [{"chosen": common.format(i=i) + f" {2 * i}", "rejected": common.format(i=i) + f" {2 * i + 1}"}
            for i in range(10)]
    rows.append({"chosen": "x\n\nAssistant: same", "rejected": "x\n\nAssistant: same"})
    f = write_jsonl(tmp_path / "hh.jsonl", rows)
    dm = PreferenceDataModule(train_file=f, tokenizer=tiny_model_dir, template="plain", batch_size=3, val_split=0.2)
    dm.setup("fit")
    assert dm.train_report.dropped == {"chosen_equals_rejected": 1} and balanced(dm.train_report)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "margin", "labels", "line"}
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [0.0, 0.0, 0.0]
    chosen, rejected = batch["input_ids"][:3], batch["input_ids"][3:]
    for c, r, mc, mr in zip(chosen, rejected, batch["attention_mask"][:3], batch["attention_mask"][3:]):
        tc, tr = dm.tokenizer.decode(c[mc.bool()]), dm.tokenizer.decode(r[mr.bool()])
        prompt = tc[: tc.rindex("Assistant:")]
        assert tr.startswith(prompt) and tc != tr and tc.endswith("<|im_end|>")
    for ids, labels in zip(batch["input_ids"], batch["labels"]):  # DPO's labels: the response after "Assistant:"
        assert dm.tokenizer.decode(ids[labels != -100]).startswith(" ") and "Assistant" not in \
            dm.tokenizer.decode(ids[labels != -100])
    assert len(list(dm.val_dataloader())) == 1


def test_prompt_end_to_end(tiny_model_dir, tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(6)]
    f = write_jsonl(tmp_path / "gsm.jsonl", rows)
    dm = PromptDataModule(train_file=f, tokenizer=tiny_model_dir, batch_size=3, val_split=0, num_proc=2)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "prompts", "answers"}
    assert batch["attention_mask"][:, -1].all()  # left padded: every row ends on a real token
    assert all(a.startswith("#### ") for a in batch["answers"])
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], batch["prompts"]):
        assert dm.tokenizer.decode(ids[mask.bool()]) == text and text.endswith("<|im_start|>assistant\n")
