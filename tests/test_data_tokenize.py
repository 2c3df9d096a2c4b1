"""Templates, tokenization with completion-only labels and overlong policies, and the collators."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from lit_ft.data.collate import PackedSFTCollator, PreferenceCollator, PromptCollator, SFTCollator
from lit_ft.data.readers import DataReport
from lit_ft.data.templates import check_template, render_pair, render_prompt, render_segments
from lit_ft.data.tokenize import (
    IGNORE_INDEX, preference_example, prompt_example, sft_example, tokenize_records, tokenize_segments,
)
from lit_ft.errors import ConfigError, DataError

U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ templates


def test_chat_multi_turn_every_assistant_turn_trainable(tiny_tokenizer):
    msgs = [U("hi"), A("hello"), U("add 2 and 2"), A("4")]
    segments = render_segments(msgs, tiny_tokenizer, "chat", system_prompt="be brief")
    assert [t for _, t in segments] == [False, True, False, True]
    assert segments[0][0] == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert segments[1][0] == "hello<|im_end|>\n"
    assert segments[2][0] == "<|im_start|>user\nadd 2 and 2<|im_end|>\n<|im_start|>assistant\n"
    assert "".join(s for s, _ in segments) == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}] + msgs, tokenize=False)


def test_empty_system_prompt_is_an_empty_system_turn(tiny_tokenizer):
    """system_prompt "" renders an empty system turn (the demo configs' setting: SmolLM2's template, which the tiny
    tokenizer carries, inserts its default system turn when a conversation has none); None leaves the template's
    default; a row's own system turn wins over either."""
    prompt = render_prompt([U("hi")], tiny_tokenizer, "chat", "")
    assert prompt == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    default = render_prompt([U("hi")], tiny_tokenizer, "chat", None)
    assert default == tiny_tokenizer.apply_chat_template([U("hi")], tokenize=False, add_generation_prompt=True)
    own = [{"role": "system", "content": "be brief"}, U("hi")]
    assert render_prompt(own, tiny_tokenizer, "chat", "") == render_prompt(own, tiny_tokenizer, "chat", None)
    assert render_segments([U("hi"), A("4")], tiny_tokenizer, "plain", system_prompt="") == \
        render_segments([U("hi"), A("4")], tiny_tokenizer, "plain")


def test_alpaca_and_plain_text(tiny_tokenizer):
    msgs = [U("Add the numbers."), A("7")]
    seg = render_segments(msgs, tiny_tokenizer, "alpaca", input="3 and 4")
    assert seg == [("### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Response:\n", False),
                   ("7<|im_end|>", True)]
    seg = render_segments(msgs, tiny_tokenizer, "alpaca", system_prompt="Below is an instruction.")
    assert seg[0][0] == "Below is an instruction.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
    assert render_segments(msgs, tiny_tokenizer, "plain") == [("Add the numbers.", False), ("7<|im_end|>", True)]
    assert render_prompt([U("q")], tiny_tokenizer, "chat") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert render_pair([U("q")], "a", tiny_tokenizer, "alpaca") == ("### Instruction:\nq\n\n### Response:\n", "a<|im_end|>")


def test_chat_template_required(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template; use template 'alpaca' or 'plain'"):
        check_template("chat", tok)
    check_template("alpaca", tok)


# ------------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("template", ["chat", "alpaca", "plain"])
def test_completion_only_labels_keep_eos(tiny_tokenizer, template):
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case that loses EOS when labels mask pad ids
    rec = {"messages": [U("What is 12 plus 30?"), A("The answer is 42.")], "input": None, "line": 1}
    out = sft_example(rec, tok, template, None, 256, "error", True, "f.jsonl")
    ids, labels = out["input_ids"], out["labels"]
    assert out["drop"] == "" and len(ids) == len(labels)
    assert labels[-1] == tok.eos_token_id or (template == "chat" and tok.eos_token_id in labels)
    assert trained_text(tok, ids, labels).startswith("The answer is 42.<|im_end|>")
    assert labels[0] == IGNORE_INDEX
    full = sft_example(rec, tok, template, None, 256, "error", False, "f.jsonl")
    assert full["labels"] == full["input_ids"] == ids


def test_final_label_is_eos_for_plain(tiny_tokenizer):
    segments = [("Q: 1+1?", False), ("2" + tiny_tokenizer.eos_token, True)]
    ids, labels, drop = tokenize_segments(segments, tiny_tokenizer, 64)
    assert labels[-1] == ids[-1] == tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id and drop == ""


# ------------------------------------------------------------------------------------------------ overlong


def _segments(tok, n_prompt_words=30):
    return [(" ".join(["fox"] * n_prompt_words), False), ("The answer is 42." + tok.eos_token, True)]


def test_overlong_policies(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels, _ = tokenize_segments(_segments(tok), tok, 10_000)
    n = len(ids) - 5
    assert tokenize_segments(_segments(tok), tok, n, "drop") == ([], [], "too_long")
    t_ids, t_labels, drop = tokenize_segments(_segments(tok), tok, n, "truncate_prompt")
    assert drop == "" and len(t_ids) == n
    assert t_ids == ids[-n:] and t_labels == labels[-n:]  # the prompt lost its start, the response kept its end
    with pytest.raises(DataError) as e:
        tokenize_segments(_segments(tok), tok, n, "error", file="train.jsonl", line=7)
    msg = str(e.value)
    assert msg.startswith("train.jsonl:7:") and f"{len(ids)} tokens exceed data.max_length={n}" in msg
    assert "prompt" in msg and "response" in msg


def test_no_trainable_token_is_never_returned(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = [("hi", False), (" ".join(["answer"] * 20) + tok.eos_token, True)]
    response_len = len(tok(segments[1][0], add_special_tokens=False)["input_ids"])
    for policy in ("drop", "truncate_prompt"):
        assert tokenize_segments(segments, tok, response_len - 1, policy) == ([], [], "too_long")
        # exactly the response: nothing before its first token, but the rest is still predicted
        assert tokenize_segments(segments, tok, response_len, policy)[2] == "too_long"
    with pytest.raises(DataError, match="data.max_length"):
        tokenize_segments(segments, tok, response_len - 1, "error")
    assert tokenize_segments([("", False), ("x", True)], tok, 64)[2] == "no_trainable_tokens"


def test_preference_truncates_the_shared_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": [U(" ".join(["fox"] * 30))], "chosen": "The answer is 42.", "rejected": "wrong", "margin": 1.5,
           "line": 3}
    full = preference_example(rec, tok, "chat", None, 10_000, "error", "p.jsonl")
    n = len(full["chosen_input_ids"]) - 5
    cut = preference_example(rec, tok, "chat", None, n, "truncate_prompt", "p.jsonl")
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][-n:] and len(cut["chosen_input_ids"]) == n
    k = len(full["rejected_input_ids"]) - 5  # rejected is shorter: both lose the same 5 prompt tokens
    assert cut["rejected_input_ids"] == full["rejected_input_ids"][5:] and len(cut["rejected_input_ids"]) == k
    assert cut["margin"] == 1.5 and cut["drop"] == ""
    assert preference_example(rec, tok, "chat", None, n, "drop", "p.jsonl")["drop"] == "too_long"
    assert preference_example(rec, tok, "chat", None, 5, "truncate_prompt", "p.jsonl")["drop"] == "too_long"
    with pytest.raises(DataError, match=r"p.jsonl:3: .*chosen .*rejected"):
        preference_example(rec, tok, "chat", None, n, "error", "p.jsonl")


def test_hh_pairs_render_like_the_policy_answers_and_feed_sft_their_chosen_side(tmp_path, tiny_tokenizer):
    """Under the chat template an HH response loses the space after 'Assistant:' (a policy's sampled chat answer
    has none: a reward model trained with it would score tokens PPO never samples); the plain template keeps the
    transcript as written. The same file feeds SFT (its chosen side), the reward model and the prompts."""
    from lit_ft.data.records import load_records

    tok = tiny_tokenizer
    common = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: add 2 and 2\n\nAssistant:"
    f = tmp_path / "hh.jsonl"
    f.write_text(json.dumps({"chosen": common + " It is 4.", "rejected": common + " 5"}) + "\n")
    pair = load_records(str(f), "preference")[0][0] | {"line": 1}
    chat = preference_example(pair, tok, "chat", None, 512, "error", "hh.jsonl")
    prompt_ids = chat["chosen_input_ids"][: chat["prompt_length"]]
    assert tok.decode(chat["chosen_input_ids"][chat["prompt_length"]:]).startswith("It is 4.")
    sampled = tok("It is 4.", add_special_tokens=False)["input_ids"]
    assert chat["chosen_input_ids"][chat["prompt_length"]:][: len(sampled)] == sampled
    assert tok.decode(prompt_ids).endswith("add 2 and 2<|im_end|>\n<|im_start|>assistant\n")
    plain = preference_example(pair, tok, "plain", None, 512, "error", "hh.jsonl")
    assert tok.decode(plain["chosen_input_ids"]) == common + " It is 4." + tok.eos_token

    (sft,), report = load_records(str(f), "instruction")
    assert report.rows_kept == 1 and sft["messages"][-1] == A(" It is 4.")
    chat_sft = sft_example(sft, tok, "chat", None, 512, "error", True, "hh.jsonl")
    # every assistant turn of the chosen conversation is trained, as for any messages row
    assert trained_text(tok, chat_sft["input_ids"], chat_sft["labels"]) == "hello<|im_end|>\nIt is 4.<|im_end|>\n"
    assert chat_sft["input_ids"][: len(prompt_ids)] == prompt_ids  # the prompt the reward model and PPO see
    plain_sft = sft_example(sft, tok, "plain", None, 512, "error", True, "hh.jsonl")
    assert tok.decode(plain_sft["input_ids"]) == common + " It is 4." + tok.eos_token
    assert trained_text(tok, plain_sft["input_ids"], plain_sft["labels"]) == " It is 4." + tok.eos_token


def test_prompt_example_keeps_the_end(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": [U(" ".join(["fox"] * 30))], "input": None, "answer": "42", "line": 1}
    full = prompt_example(rec, tok, "chat", None, 10_000, "error", "x")
    assert full["prompt"].endswith("<|im_start|>assistant\n") and full["answer"] == "42"
    cut = prompt_example(rec, tok, "chat", None, 10, "truncate_prompt", "x")
    assert cut["input_ids"] == full["input_ids"][-10:] and cut["prompt"].endswith("<|im_start|>assistant\n")
    assert prompt_example(rec, tok, "chat", None, 10, "drop", "x")["drop"] == "too_long"


def test_tokenize_records_counts_drops(tiny_tokenizer):
    records = [{"messages": [U("q" * i), A("answer " * (4 * i))], "input": None, "line": i} for i in range(1, 9)]
    report = DataReport("t.jsonl", rows_read=8, rows_kept=8)
    ds = tokenize_records(records, "instruction", report, tokenizer=tiny_tokenizer, template="plain",
                          system_prompt=None, max_length=20, overlong="truncate_prompt", completion_only=True,
                          file="t.jsonl")
    assert report.dropped.get("too_long", 0) > 0 and report.rows_kept == len(ds)
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    assert set(ds.column_names) == {"input_ids", "labels", "line"}
    assert all(len(r) <= 20 and any(x != IGNORE_INDEX for x in r[1:]) for r in ds["labels"])


# ------------------------------------------------------------------------------------------------ collators


def test_sft_collator_right_pads():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = SFTCollator(pad_token_id=2)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["input_ids"].dtype == torch.long and b["labels"].dtype == torch.long
    assert SFTCollator(2, pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, 8)


def test_preference_collator_chosen_then_rejected():
    rows = [{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 4], "margin": 2.0},
            {"chosen_input_ids": [5], "rejected_input_ids": [5, 6], "margin": None}]
    b = PreferenceCollator(pad_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [1, 4, 0], [5, 6, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert b["margin"].tolist() == [2.0, 0.0] and b["margin"].dtype == torch.float


def test_prompt_collator_left_pads():
    rows = [{"input_ids": [1, 2, 3], "prompt": "abc", "answer": "7"}, {"input_ids": [4], "prompt": "d", "answer": None}]
    b = PromptCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert b["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["prompts"] == ["abc", "d"] and b["answers"] == ["7", None]


def test_packing_restarts_positions_and_never_predicts_across_boundaries():
    rows = [{"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
            {"input_ids": [20, 21], "labels": [20, 21]},
            {"input_ids": [30, 31, 32, 33], "labels": [-100, -100, 32, 33]}]
    b = PackedSFTCollator(pad_token_id=0, max_length=6)(rows)
    # first-fit decreasing: the 4-token row opens the first packed row, the 3-token one does not fit beside it and
    # opens the second, the 2-token one fills the first; the second is padded to 6
    assert b["input_ids"].tolist() == [[30, 31, 32, 33, 20, 21], [10, 11, 12, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, -100, 32, 33, -100, 21], [-100, 11, 12, -100, -100, -100]]
    assert b["seq_lens"].tolist() == [4, 2, 3] and b["attention_mask"].eq(1).all()
    # no label at a position where a sequence starts (its predictor would be another sequence's token)
    starts = b["position_ids"] == 0
    assert (b["labels"][starts] == IGNORE_INDEX).all()
    # packing in order would need three rows for lengths 3, 4, 2, 3 in rows of 6; first-fit decreasing needs two
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 3], start=1)]
    b = PackedSFTCollator(pad_token_id=0, max_length=6)(rows)
    assert b["input_ids"].tolist() == [[2, 2, 2, 2, 3, 3], [1, 1, 1, 4, 4, 4]]


def test_collators_pickle():
    for c in (SFTCollator(2), PackedSFTCollator(2, 64), PreferenceCollator(2), PromptCollator(2, 8)):
        assert pickle.loads(pickle.dumps(c)) == c
