"""KTO: the loss against hand-computed numbers (the reference point z0 from mismatched pairs, clamped at 0), the
unpaired data (TRL's rows, preference pairs as one desirable + one undesirable example, the exact DataErrors), the
mismatched pairs of a batch, KTOModule on a tiny random Llama (the start, which weights train, the KL over ranks,
precomputed vs on-the-fly reference, learning against the start), bad settings, the recipe and its plan."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.data.collate import UnpairedCollator, mismatched_partners
from lit_ft.data.modules import UnpairedPreferenceDataModule
from lit_ft.data.records import load_records, unpair
from lit_ft.errors import ConfigError, DataError
from lit_ft.losses import kto_kl, kto_loss
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.stages.kto import KTOModule, KTOSpec, balance_advice, pair_accuracy
from lit_ft.train.optim import OptimSpec
from tests.test_dpo import _sft_adapter
from tests.test_resume import PAIRS, Recorder

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- the loss


def test_loss_against_hand_computed_numbers():
    """beta 0.5, lambda_D 2, lambda_U 0.5; the KL estimate from two mismatched pairs, log-ratios 0.6 and 0.2."""
    kl = kto_kl(torch.tensor([-2.0, -3.0]), torch.tensor([-2.6, -3.2]))
    assert float(kl) == pytest.approx(0.4)
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.0])  # log-ratios r = 0.5, -1.0, 0.0
    desirable = torch.tensor([True, False, True])
    losses, rewards, z0 = kto_loss(policy, ref, desirable, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    want = [2.0 * (1 - _sig(0.5 * (0.5 - 0.4))), 0.5 * (1 - _sig(0.5 * (0.4 + 1.0))), 2.0 * (1 - _sig(0.5 * -0.4))]
    assert losses.tolist() == pytest.approx(want, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0]) and not rewards.requires_grad
    assert float(z0) == pytest.approx(0.4)
    # d/d logp of w (1 - sigmoid(beta (r - z0))) = -w beta s (1 - s); of the undesirable side: +w beta s (1 - s)
    losses.sum().backward()
    s0, s1, s2 = _sig(0.05), _sig(0.7), _sig(-0.2)
    assert policy.grad.tolist() == pytest.approx([-2.0 * 0.5 * s0 * (1 - s0), 0.5 * 0.5 * s1 * (1 - s1),
                                                  -2.0 * 0.5 * s2 * (1 - s2)], abs=1e-6)


def test_negative_kl_is_clamped_to_zero_and_carries_no_gradient():
    kl = kto_kl(torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -1.5]))  # log-ratios -1.0, 0.5: mean -0.25
    assert float(kl) == pytest.approx(-0.25)
    kl_leaf = kl.clone().requires_grad_(True)
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _, z0 = kto_loss(policy, torch.tensor([-1.2, -0.7]), torch.tensor([True, False]), kl_leaf, beta=0.1)
    assert float(z0) == 0.0
    assert losses.tolist() == pytest.approx([1 - _sig(0.1 * 0.2), 1 - _sig(0.1 * 0.3)], abs=1e-7)
    losses.sum().backward()
    assert kl_leaf.grad is None and policy.grad is not None  # z0 is a constant of the loss


def test_at_the_start_each_loss_is_half_its_weight():
    zeros = torch.zeros(4)
    losses, rewards, z0 = kto_loss(zeros, zeros, torch.tensor([True, True, False, False]), kto_kl(zeros, zeros),
                                   desirable_weight=1.5, undesirable_weight=0.5)
    assert losses.tolist() == [0.75, 0.75, 0.25, 0.25] and rewards.abs().max() == 0 and float(z0) == 0
    assert float(kto_kl(torch.zeros(0), torch.zeros(0))) == 0.0  # no mismatched pair: no KL estimate


def test_pair_accuracy_reads_pairs_by_line():
    lines, desirable = torch.tensor([3, 3, 5, 5, 9]), torch.tensor([True, False, False, True, True])
    acc = pair_accuracy(lines, desirable, torch.tensor([0.2, 0.1, 0.4, 0.3, 0.0]))
    assert acc.tolist() == [1.0, 0.0]  # line 9 has no undesirable partner in the batch


def test_balance_advice_names_weights_that_fit():
    assert balance_advice(10, 10, KTOSpec()) is None and balance_advice(13, 10, KTOSpec()) is None
    message = balance_advice(30, 10, KTOSpec())
    assert "= 1 x 30 / (1 x 10) = 3.000, outside the [1, 4/3]" in message
    assert "model.kto.desirable_weight in [0.333, 0.444] or model.kto.undesirable_weight in [2.250, 3.000]" in message
    assert balance_advice(30, 10, KTOSpec(desirable_weight=0.4)) is None  # 0.4 x 30 / 10 = 1.2
    assert balance_advice(5, 0, KTOSpec()) is None  # one class absent: the DataModule warns


# ---------------------------------------------------------------------------------------------- data

UNPAIRED = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b + (i % 2)}.",
             "label": i % 2 == 0} for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(4))]


def test_unpaired_rows_string_and_conversational(tmp_path):
    rows = [{"prompt": "2 + 3?", "completion": "5", "label": True},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}],
             "completion": [{"role": "assistant", "content": "6"}], "label": False}]
    records, report = load_records(_write(tmp_path / "u.jsonl", rows), "unpaired")
    assert [(r["prompt"][-1]["content"], r["completion"], r["label"], r["line"]) for r in records] == \
        [("2 + 3?", "5", True, 1), ("2 + 3?", "6", False, 2)]
    assert records[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert (report.rows_read, report.rows_kept) == (2, 2)
    csv = tmp_path / "u.csv"  # CSV cells are text: true / false
    csv.write_text("prompt,completion,label\n2 + 3?,5,true\n2 + 3?,6,FALSE\n")
    assert [r["label"] for r in load_records(str(csv), "unpaired")[0]] == [True, False]


PAIR_SHAPES = {
    "prompt_chosen_rejected": {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"},
    "chat": {"chosen": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}],
             "rejected": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "6"}]},
    "chat_explicit_prompt": {"prompt": [{"role": "user", "content": "2 + 3?"}],
                             "chosen": [{"role": "assistant", "content": "5"}],
                             "rejected": [{"role": "assistant", "content": "6"}]},
    "hh": {"chosen": "\n\nHuman: 2 + 3?\n\nAssistant: 5", "rejected": "\n\nHuman: 2 + 3?\n\nAssistant: 6"},
}


@pytest.mark.parametrize("shape", sorted(PAIR_SHAPES))
def test_a_pair_becomes_one_desirable_and_one_undesirable_example(shape, tmp_path):
    other = {"prompt": "1 + 1?", "chosen": "2", "rejected": "3"} if shape == "prompt_chosen_rejected" else None
    rows = [PAIR_SHAPES[shape]] + ([other] if other else [])
    records, report = load_records(_write(tmp_path / "p.jsonl", rows), "unpaired")
    assert "chosen" in records[0] and report.rows_read == len(rows)  # read and split as pairs
    examples = unpair(records, report)
    first = [(r["prompt"][-1]["content"], r["completion"].strip(), r["label"], r["line"]) for r in examples[:2]]
    assert first == [("2 + 3?", "5", True, 1), ("2 + 3?", "6", False, 1)]
    assert all("chosen" not in r and "rejected" not in r for r in examples)
    assert (report.rows_read, report.rows_kept) == (2 * len(rows), 2 * len(rows))  # the report counts examples
    report.check()


def test_datamodule_reads_pairs_as_examples_with_completion_only_labels(tmp_path, tiny_model_dir):
    dm = UnpairedPreferenceDataModule(train_file=_write(tmp_path / "t.jsonl", PAIRS),
                                      val_file=_write(tmp_path / "v.jsonl", PAIRS[:3]), tokenizer=tiny_model_dir,
                                      batch_size=4, max_length=64)
    dm.setup("fit")
    assert dm.label_counts == {"train": (16, 16), "val": (3, 3)}
    assert dm.train_report.rows_read == 32 and dm.val_report.rows_kept == 6
    assert dm.val_dataset["line"] == [1, 1, 2, 2, 3, 3] and dm.val_dataset["label"] == [True, False] * 3
    row = dm.train_dataset[0]
    n = row["prompt_length"]
    assert row["labels"][:n] == [-100] * n and row["labels"][n:] == row["input_ids"][n:]
    assert dm.tokenizer.decode(row["input_ids"][n:]).endswith("<|im_end|>\n")
    prompt, answer = dm.held_out_prompts(2)[1]
    assert prompt.endswith("<|im_start|>assistant\n") and answer == PAIRS[1]["chosen"]


def test_one_class_absent_warns(tmp_path, tiny_model_dir):
    rows = [dict(r, label=True) for r in UNPAIRED]
    dm = UnpairedPreferenceDataModule(train_file=_write(tmp_path / "t.jsonl", rows), tokenizer=tiny_model_dir,
                                      batch_size=4, max_length=64)
    with pytest.warns(UserWarning, match="the training data has no undesirable examples"):
        dm.setup("fit")


BAD_ROWS = [
    ({"label": "yes"}, "field 'label': expected true or false (is the completion desirable?), got str ('yes')"),
    ({"label": 1}, "field 'label': expected true or false (is the completion desirable?), got int (1)"),
    ({"label": None}, "field 'label': expected true or false (is the completion desirable?), missing"),
    ({"completion": [{"role": "assistant", "content": "4"}] * 2},
     "field 'completion': expected a string or a list of one {'role': 'assistant', 'content': str} message"),
    ({"completion": 4}, "field 'completion': expected a string, got int ('4')"),
    ({"prompt": [{"role": "assistant", "content": "hi"}]}, "field 'prompt[0].role': expected 'user'"),
]


@pytest.mark.parametrize("change,message", BAD_ROWS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_ROWS)])
def test_bad_rows_give_the_exact_data_error_or_a_counted_drop(change, message, tmp_path):
    rows = [UNPAIRED[0], dict(UNPAIRED[1], **change), UNPAIRED[2]]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(path, "unpaired")
    assert str(info.value).startswith(f"{path}:2: {message}"), str(info.value)
    records, report = load_records(path, "unpaired", skip_bad_rows=True)
    assert [r["line"] for r in records] == [1, 3] and report.dropped == {"malformed": 1}


# ---------------------------------------------------------------------------------------------- batches


def test_mismatched_partners_shift_by_one_past_the_same_prompt():
    assert mismatched_partners([[1], [2], [3]]) == [2, 0, 1]  # each prompt gets the previous row's completion
    assert mismatched_partners([[1], [1], [2], [2]]) == [3, 3, 1, 1]  # a pair's two examples side by side
    assert mismatched_partners([[7], [7], [7]]) == [2, 0, 1]  # one prompt only: shifted by one all the same


def test_collator_pairs_each_prompt_with_another_completion():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "prompt_length": 2, "label": True, "line": 1},
            {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "prompt_length": 1, "label": False, "line": 1},
            {"input_ids": [12, 13, 14, 15, 16], "labels": [-100, -100, -100, 15, 16], "prompt_length": 3,
             "label": True, "line": 2}]
    batch = UnpairedCollator(pad_token_id=0, max_length=5)(rows)
    assert batch["label"].tolist() == [True, False, True] and batch["example"].tolist() == [2, 3, 4]
    assert batch["labels"][1].tolist() == [-100, 10, 11, -100, -100]
    # partners 2, 0, 1: prompt 0 + completion 2; prompt 1 + completion 0; prompt 2 (cut to 5 - 2 = 3 tokens, all of
    # it) + completion 1
    want = [([5, 6, 15, 16], [-100, -100, 15, 16]), ([9, 7, 8], [-100, 7, 8]), ([12, 13, 14, 10, 11],
                                                                                 [-100, -100, -100, 10, 11])]
    for i, (ids, labels) in enumerate(want):
        assert batch["kl_input_ids"][i, :len(ids)].tolist() == ids
        assert batch["kl_labels"][i].tolist() == labels + [-100] * (5 - len(ids))
        assert int(batch["kl_attention_mask"][i].sum()) == len(ids)
    cut = UnpairedCollator(pad_token_id=0, max_length=4)(rows)  # prompt 2 + completion 1 is cut from the left
    assert cut["kl_input_ids"][2].tolist() == [13, 14, 10, 11]
    assert "kl_input_ids" not in UnpairedCollator(0, 5)(rows[:1])  # one row: no mismatched pair


# ---------------------------------------------------------------------------------------------- the module


def _datamodule(tmp_path, model_dir, rows=PAIRS, **kw) -> UnpairedPreferenceDataModule:
    kw = {"batch_size": 4, "max_length": 64, **kw}
    dm = UnpairedPreferenceDataModule(train_file=_write(tmp_path / "kto_train.jsonl", rows),
                                      val_file=_write(tmp_path / "kto_val.jsonl", rows[:4]), tokenizer=model_dir, **kw)
    dm.setup("fit")
    return dm


def _module(model_dir, sft_adapter=None, lr=1e-2, **kto) -> KTOModule:
    module = KTOModule(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4, alpha=8), sft_adapter=sft_adapter,
                       kto=KTOSpec(**kto), optim=OptimSpec(lr=lr, warmup_steps=0, scheduler="constant"))
    module.configure_model()
    return module


def _trainer(tmp_path, max_steps, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                     enable_checkpointing=False, **kw)


@pytest.mark.parametrize("with_sft", [False, True], ids=["new_lora_vs_base", "sft_copy_vs_sft"])
def test_at_the_start_rewards_and_kl_are_zero(with_sft, tmp_path, tiny_model_dir):
    dm = _datamodule(tmp_path, tiny_model_dir)
    module = _module(tiny_model_dir, _sft_adapter(tiny_model_dir, tmp_path / "sft") if with_sft else None)
    losses, stats = module.example_stats(next(iter(dm.train_dataloader())), "train")
    assert losses.tolist() == pytest.approx([0.5] * 4, abs=1e-6)
    assert float(stats["kl"]) == 0.0
    assert torch.cat([stats["rewards/chosen"], stats["rewards/rejected"]]).abs().max() < 1e-6


def test_gradients_reach_only_the_policy_and_the_reference_never_moves(tmp_path, tiny_model_dir):
    dm = _datamodule(tmp_path, tiny_model_dir)
    module = _module(tiny_model_dir, _sft_adapter(tiny_model_dir, tmp_path / "sft"))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    losses, _ = module.example_stats(next(iter(dm.train_dataloader())), "train")
    losses.mean().backward()
    with_grad = {n for n, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".policy." in n and "lora_" in n for n in with_grad)
    module.model.zero_grad()
    _trainer(tmp_path, 6, limit_val_batches=0).fit(module, datamodule=dm)
    after = dict(module.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and all(".policy." in n for n in moved)  # the reference adapter and the base are untouched


class _Strategy:
    """One more rank's mismatched pairs, added by the all-reduce: log-ratio sum 3.0 over 2 pairs."""

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.tensor([3.0, 2.0])


class _Trainer:
    strategy = _Strategy()


def test_kl_estimate_is_the_mean_over_every_ranks_pairs(tmp_path, tiny_model_dir):
    dm = _datamodule(tmp_path, tiny_model_dir)
    module = _module(tiny_model_dir)
    with torch.no_grad():  # move the policy, so this rank's mismatched log-ratios are not 0
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    batch = next(iter(dm.train_dataloader()))
    mine = module.kl_estimate(batch)  # no trainer: this process alone
    pairs = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
             "labels": batch["kl_labels"]}
    from lit_ft.stages.dpo_ref import sequence_logps

    with torch.no_grad():
        policy, _ = sequence_logps(module.model, pairs)
        with module.model.disable_adapter():
            ref, _ = sequence_logps(module.model, pairs)
    assert abs(float(mine)) > 1e-3 and float(mine) == pytest.approx(float((policy - ref).mean()), abs=1e-5)
    module._trainer = _Trainer()
    try:
        both = module.kl_estimate(batch)
    finally:
        module._trainer = None
    assert float(both) == pytest.approx((float(mine) * 4 + 3.0) / 6, abs=1e-5)


def test_precomputed_and_on_the_fly_reference_agree(tmp_path, tiny_model_dir):
    dm = _datamodule(tmp_path, tiny_model_dir)
    sft = _sft_adapter(tiny_model_dir, tmp_path / "sft")
    runs = {}
    for pre in (False, True):
        module = _module(tiny_model_dir, sft, precompute_ref=pre)
        rec = Recorder()
        _trainer(tmp_path, 5, [rec], limit_val_batches=0).fit(module, datamodule=dm)
        runs[pre] = rec.values, module
    (fly, _), (pre, module) = runs[False], runs[True]
    assert module.precomputed == ["train", "val"] and module.ref_tables["train"].logps.shape == (32, 1)
    for step in fly:
        torch.testing.assert_close(fly[step], pre[step], rtol=1e-5, atol=1e-6)


def _answers(first_numbers) -> list[dict]:
    """Pairs: the answer against an off-topic completion."""
    return [{"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
             "rejected": f"the lazy dog jumps {a} times."} for a in first_numbers for b in range(4)]


def test_a_short_fit_raises_desirable_rewards_above_undesirable(tmp_path, tiny_model_dir):
    """30 steps over 16 pairs read as 32 examples (batches of 8, beta 0.1): against the start (every reward 0, loss
    1/2, no pair ordered), the 8 held-out pairs' (new prompts) desirable examples' implicit reward rises above zero and
    above their undesirable partners', which fall below it."""
    dm = UnpairedPreferenceDataModule(train_file=_write(tmp_path / "t.jsonl", _answers(range(4))),
                                      val_file=_write(tmp_path / "v.jsonl", _answers(range(4, 6))),
                                      tokenizer=tiny_model_dir, batch_size=8, max_length=64)
    dm.setup("fit")
    module = _module(tiny_model_dir)
    L.seed_everything(0)
    trainer = _trainer(tmp_path, 30, num_sanity_val_steps=0, val_check_interval=30, check_val_every_n_epoch=None)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"\nKTO tiny fit: val/rewards/margins {before['val/rewards/margins']:.4f} -> {after['val/rewards/margins']:.4f}"
          f" (chosen {after['val/rewards/chosen']:.4f}, rejected {after['val/rewards/rejected']:.4f}); pair accuracy "
          f"{before['val/rewards/accuracies']:.3f} -> {after['val/rewards/accuracies']:.3f}; loss "
          f"{before['val/loss']:.4f} -> {after['val/loss']:.4f}; kl {after['val/kl']:.4f}")
    assert before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6) and before["val/loss"] == pytest.approx(0.5)
    assert before["val/rewards/accuracies"] == 0.0
    assert after["val/rewards/margins"] > 0.5 and after["val/rewards/accuracies"] >= 0.875
    assert after["val/rewards/chosen"] > 0 > after["val/rewards/rejected"] and after["val/loss"] < 0.45
    for k in ("train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
              "train/logps/chosen", "train/logps/rejected"):
        assert k in trainer.callback_metrics, k


def test_killed_run_resumes_exactly_without_recomputing_the_reference(tiny_model_dir, tmp_path_factory, tmp_path):
    """Dropout on (the RNG matters), the reference precomputed (its table rides in the checkpoint under
    `kto_reference`); 16 unpaired rows / batch 4 = 4 steps an epoch, 3 epochs, killed after step 7."""
    from tests.test_resume import LORA, OPTIM, Runs, Stage, _final, _loss

    stage = Stage(UNPAIRED, UnpairedPreferenceDataModule,
                  lambda d: KTOModule(base=ModelSpec(name_or_path=d), lora=LORA, optim=OPTIM,
                                      kto=KTOSpec(precompute_ref=True, disable_dropout=False)),
                  _loss, epochs=3, kills={"mid_epoch": 7})
    runs = Runs(stage, tiny_model_dir, tmp_path_factory)
    values, weights = runs.uninterrupted
    ckpt_dir, first = runs.killed(7)
    assert all(torch.equal(v, values[b]) for b, v in first.items())
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state[KTOModule.REF_KEY]["train"]["logps"].shape == (len(UNPAIRED), 1)
    second, module, _ = runs.resume(ckpt_dir / "last.ckpt", tmp_path)
    assert module.precomputed == [] and sorted(second) == list(range(8, 13))  # both tables from the checkpoint
    for batch, value in second.items():
        assert torch.equal(value, values[batch]), (batch, value.tolist(), values[batch].tolist())
    resumed = _final(module)
    assert [k for k in weights if not torch.equal(resumed[k], weights[k])] == []


# ---------------------------------------------------------------------------------------------- settings, recipe


@pytest.mark.parametrize("kw,message", [
    ({"beta": 0.0}, "model.kto.beta=0.0: expected a number > 0"),
    ({"desirable_weight": -1.0}, "model.kto.desirable_weight=-1.0: expected a number > 0"),
    ({"undesirable_weight": float("nan")}, "model.kto.undesirable_weight=nan: expected a number > 0"),
    ({"logp_chunk_size": 0}, "model.kto.logp_chunk_size=0: expected an integer >= 1"),
])
def test_bad_settings_give_the_exact_config_error(kw, message):
    with pytest.raises(ConfigError) as info:
        KTOSpec(**kw)
    assert str(info.value) == message


def test_bad_module_and_data_settings_name_the_setting(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="KTO needs a policy adapter: set model.sft_adapter or model.lora"):
        KTOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=None)
    with pytest.raises(ConfigError, match=r"^model\.max_consecutive_skips=0: expected an integer >= 1$"):
        KTOModule(base=ModelSpec(name_or_path=tiny_model_dir), max_consecutive_skips=0)
    for kw, message in [({"batch_size": 1}, "data.batch_size=1: expected an integer >= 2"),
                        ({"eval_batch_size": 1}, "data.eval_batch_size=1: expected an integer >= 2 or null"),
                        ({"format": "pairs"}, "data.format='pairs': expected one of ['auto', 'unpaired', "
                                              "'prompt_chosen_rejected', 'chat', 'hh']")]:
        with pytest.raises(ConfigError) as info:
            UnpairedPreferenceDataModule(train_file="x.jsonl", **kw)
        assert str(info.value) == message


def test_a_micro_batch_of_one_set_after_the_check_is_refused(tmp_path, tiny_model_dir):
    dm = _datamodule(tmp_path, tiny_model_dir)
    dm.batch_size = 1  # as `--memory auto` sets the advice on the objects
    with pytest.raises(ConfigError, match=r"data.batch_size=1: KTO needs at least 2 examples a micro-batch"):
        _trainer(tmp_path, 1).fit(_module(tiny_model_dir), datamodule=dm)


def test_recipe_is_listed_public_and_planned(tiny_model_dir, capsys):
    import lit_ft
    from lit_ft.cli.app import main
    from lit_ft.cli.export import MODULE_CLASSES
    from lit_ft.data.recipes import recipe_names

    assert "kto" in recipe_names() and lit_ft.KTOModule is KTOModule
    assert lit_ft.UnpairedPreferenceDataModule is UnpairedPreferenceDataModule
    assert MODULE_CLASSES["lit_ft.KTOModule"] == "KTOModule"  # `lit-ft export` builds from a KTO checkpoint
    main(["plan", "--config", "kto", "--model.base.name_or_path", tiny_model_dir, "--model.sft_adapter", "null",
          "--budget", "1GiB"])  # `lit-ft plan --config kto`
    out = capsys.readouterr().out
    assert "memory plan: kto" in out and re.search(r"no-grad passes \(largest: (reference|mismatched pairs|validation)\)", out)
    assert "longest real row" in out  # the demo pairs, tokenized as the fit does
