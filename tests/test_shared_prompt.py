"""Shared-prompt preference rows (`data.share_prompt`, `SharedPromptCollator`, `lit_ft.models.shared_prompt`): each
pair one sequence, its prompt once. Against the independent reference of every pair side run alone (and the padded
batch lit_ft already had): DPO's log-probs and their gradients, a reward model's scores and gradients, on every
text family of the installed transformers (or refused by name), under SDPA and eager attention, packed or not,
with sliding windows shorter than the rows; whole DPO fits equal; and the plan's choice and shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_ft.data.collate import PreferenceCollator, SharedPromptCollator
from lit_ft.data.modules import PreferenceDataModule
from lit_ft.errors import ConfigError
from lit_ft.models import LoraSpec, ModelSpec, shared_prompt
from lit_ft.stages.dpo import DPOModule, DPOSpec
from lit_ft.stages.dpo_ref import sequence_logps
from lit_ft.train.optim import OptimSpec
from tests.family_models import FAMILIES, family_config
from tests.test_resume import PAIRS

V = 96
SIDES = [(5, 3, 4), (7, 2, 6), (3, 5, 1), (1, 4, 4), (6, 1, 1)]  # (prompt, chosen, rejected) tokens of each pair


def _rows(sides=SIDES, seed=1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c, r) in enumerate(sides):
        prompt = torch.randint(3, V, (p,), generator=g).tolist()
        out.append({"chosen_input_ids": prompt + torch.randint(3, V, (c,), generator=g).tolist(),
                    "rejected_input_ids": prompt + torch.randint(3, V, (r,), generator=g).tolist(),
                    "prompt_length": p, "line": i + 1, "margin": None})
    return out


def _alone(model, rows) -> torch.Tensor:
    """Each side's response log-prob sum from the model's own logits over that sequence alone (chosen, then
    rejected): the independent reference."""
    out = []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        for r in rows:
            ids = torch.tensor([r[key]])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            out.append(sum(logp[t - 1, ids[0, t]] for t in range(max(1, r["prompt_length"]), ids.shape[1])))
    return torch.stack(out)


def _model(family: str, impl: str, **overrides):
    """A tiny random `family` model under a LoRA adapter with random (non-zero) B matrices, as lit_ft runs it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = family_config(family, V)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = get_peft_model(AutoModelForCausalLM.from_config(config, attn_implementation=impl),
                           LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------- the collator


def test_a_pair_is_one_row_whose_responses_follow_the_prompt():
    rows = _rows()
    b = SharedPromptCollator(0)(rows)
    assert b["input_ids"].shape == (5, max(p + c + r for p, c, r in SIDES))
    p, c, r = SIDES[0]
    assert b["input_ids"][0, : p + c + r].tolist() == rows[0]["chosen_input_ids"] + rows[0]["rejected_input_ids"][p:]
    assert b["position_ids"][0, : p + c + r].tolist() == list(range(p + c)) + list(range(p, p + r))
    assert b["branch_ids"][0, : p + c + r].tolist() == [0] * p + [1] * c + [2] * r
    L = b["input_ids"].shape[1]
    # the first rejected token is predicted from the prompt's last position, not from the chosen response's end
    first_rejected = [i for i, s in enumerate(b["logp_sequence"].tolist()) if s == 5][0]
    assert int(b["logp_index"][first_rejected]) == p - 1
    assert int(b["logp_target"][first_rejected]) == rows[0]["rejected_input_ids"][p]
    assert b["last_index"].tolist()[:2] == [p + c - 1, L + SIDES[1][0] + SIDES[1][1] - 1]
    assert b["logp_index"].numel() == sum(c + r for _, c, r in SIDES)  # every response token once


def test_packed_pairs_share_rows_and_a_long_pair_gets_its_own():
    b = SharedPromptCollator(0, max_length=20)(_rows())  # pairs of 12, 15, 9, 9 and 8 tokens
    assert b["input_ids"].shape == (3, 20)
    assert set(b["segment_ids"].unique().tolist()) == {-1, 0, 1, 2, 3, 4}
    b = SharedPromptCollator(0, max_length=10)(_rows())
    assert b["input_ids"].shape == (5, 15)


def test_a_pair_whose_sides_disagree_in_the_prompt_is_named():
    rows = _rows()
    rows[2]["rejected_input_ids"][0] += 1
    with pytest.raises(ValueError, match="pair of line 3 has chosen and rejected rows that differ within their 3"):
        SharedPromptCollator(0)(rows)


# ---------------------------------------------------------------------------------------------- every family


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_each_side_its_log_probs_alone_or_is_refused(family, impl):
    try:
        model = _model(family, impl)
    except ValueError as e:  # the family has no such attention implementation in this transformers
        pytest.skip(str(e).splitlines()[0])
    rows = _rows()
    batches = [SharedPromptCollator(0)(rows), SharedPromptCollator(0, max_length=24)(rows)]
    if family == "bloom":  # ALiBi from a 2-D mask: refused before any forward
        with pytest.raises(ConfigError, match="data.share_prompt: bloom has layers other than full or sliding attention, or ALiBi"):
            sequence_logps(model, batches[0])
        return
    with torch.no_grad():
        want = _alone(model, rows)
        for batch in batches:
            got, counts = sequence_logps(model, batch)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert counts.tolist() == [c for _, c, _ in SIDES] + [r for *_, r in SIDES]


@pytest.mark.parametrize("family,impl", [("mistral", "sdpa"), ("gemma2", "eager"), ("gemma3_text", "sdpa")])
def test_sliding_windows_shorter_than_the_rows_apply_by_position(family, impl):
    """Rows longer than the window: the window counts positions within a side (a dict of masks where full and
    sliding layers mix: Gemma 2 and 3)."""
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if family != "mistral" else {}
    model = _model(family, impl, sliding_window=4, **extra)
    rows = _rows([(6, 5, 7), (9, 4, 3)])
    with torch.no_grad():
        got, _ = sequence_logps(model, SharedPromptCollator(0)(rows))
        torch.testing.assert_close(got, _alone(model, rows), rtol=1e-4, atol=1e-4)
    assert isinstance(shared_prompt.attention_mask(model, *(torch.zeros(1, 20, dtype=torch.long),) * 3),
                      torch.Tensor if family == "mistral" else dict)


def test_an_attention_without_4d_masks_is_refused_by_name():
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="data.share_prompt: needs attn_implementation sdpa or eager"):
        shared_prompt.check(model)


# ---------------------------------------------------------------------------------------------- DPO, reward


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _datamodule(tmp_path, model_dir, share, rows=PAIRS, **kw) -> PreferenceDataModule:
    rows = [dict(r, rejected=r["rejected"] + " No." * (i % 3)) for i, r in enumerate(rows)]  # uneven sides
    dm = PreferenceDataModule(train_file=_write(tmp_path / "train.jsonl", rows),
                              val_file=_write(tmp_path / "val.jsonl", rows[:6]), tokenizer=model_dir, batch_size=4,
                              max_length=64, share_prompt=share, **kw)
    dm.setup("fit")
    return dm


def _randomize(module) -> None:
    with torch.no_grad():  # a non-zero LoRA (and head), so gradients are not trivially equal
        for name, p in module.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)


def _grads(module, loss_of, batch) -> tuple[torch.Tensor, dict]:
    module.model.zero_grad()
    out = loss_of(batch)
    out[0].backward()
    return out, {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True], ids=["one_pair_a_row", "packed"])
def test_dpo_loss_and_gradients_equal_the_padded_batch(packing, tmp_path, tiny_model_dir):
    padded_dm = _datamodule(tmp_path, tiny_model_dir, False)
    shared_dm = _datamodule(tmp_path, tiny_model_dir, True, packing=packing)
    assert isinstance(shared_dm.collator(), SharedPromptCollator)
    torch.manual_seed(0)
    module = DPOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8))
    module.configure_model()
    _randomize(module)
    rows = [padded_dm.train_dataset[i] for i in range(6)]
    padded, shared = PreferenceCollator(padded_dm.tokenizer.pad_token_id)(rows), shared_dm.collator()(rows)
    assert shared["input_ids"].numel() < padded["input_ids"].numel()
    (loss_a, stats_a), grads_a = _grads(module, lambda b: module.pair_stats(b, "train"), padded)
    (loss_b, stats_b), grads_b = _grads(module, lambda b: module.pair_stats(b, "train"), shared)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for k in stats_a:
        torch.testing.assert_close(stats_b[k], stats_a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)


def test_reward_scores_and_gradients_equal_the_padded_batch(tmp_path, tiny_model_dir):
    from lit_ft.stages.reward import RewardModule

    padded_dm, shared_dm = _datamodule(tmp_path, tiny_model_dir, False), _datamodule(tmp_path, tiny_model_dir, True)
    torch.manual_seed(0)
    module = RewardModule(ModelSpec(name_or_path=tiny_model_dir), LoraSpec(r=4, dropout=0.0))
    module.configure_model()
    _randomize(module)
    module.model.eval()
    rows = [padded_dm.train_dataset[i] for i in range(6)]
    (loss_a, ca, ra), grads_a = _grads(module, module.pair_loss, padded_dm.collator()(rows))
    (loss_b, cb, rb), grads_b = _grads(module, module.pair_loss, shared_dm.collator()(rows))
    torch.testing.assert_close(torch.cat([cb, rb]), torch.cat([ca, ra]), rtol=1e-4, atol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_dpo_fit_with_shared_prompts_follows_the_padded_fit(tmp_path, tiny_model_dir):
    """Three optimizer steps with validation and a precomputed reference table: the same losses step by step."""
    losses = {}
    for share in (False, True):
        L.seed_everything(0)
        (tmp_path / str(share)).mkdir()
        dm = _datamodule(tmp_path / str(share), tiny_model_dir, share)
        module = DPOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8),
                           dpo=DPOSpec(precompute_ref=True),
                           optim=OptimSpec(lr=1e-2, warmup_steps=0, scheduler="constant"))
        seen = []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(float(trainer.callback_metrics["train/loss"]))

        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                            callbacks=[Losses()], num_sanity_val_steps=0, val_check_interval=3)
        trainer.fit(module, datamodule=dm)
        losses[share] = seen + [float(trainer.callback_metrics["val/loss"])]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------- the plan


def test_auto_shares_the_prompt_where_the_datamodule_leaves_it_and_plans_the_pairs_rows(tmp_path, tiny_model_dir):
    import dataclasses

    from lit_ft.plan import estimate_settings
    from lit_ft.plan.auto import _shape, _shared, apply, choose, step_seconds
    from lit_ft.plan.memory import settings_from

    dm = _datamodule(tmp_path, tiny_model_dir, None)
    module = DPOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4))
    s = settings_from(module, dm, target="cuda")
    assert s.share_prompt_auto and not s.share_prompt
    chosen, whats, args = choose(s, 80 * 2**30)
    assert chosen.share_prompt and "shared prompts" in whats
    assert args[args.index("--data.share_prompt"):][:2] == ["--data.share_prompt", "true"]
    # the rows planned are the collator's: one a pair, as long as the longest prompt + both responses
    rows = sorted((dm.train_dataset[i] for i in range(len(dm.train_dataset))),
                  key=lambda r: r["prompt_length"] - len(r["chosen_input_ids"]) - len(r["rejected_input_ids"]))
    assert _shape(chosen)[:2] == tuple(SharedPromptCollator(0)(rows[:4])["input_ids"].shape)
    assert math.prod(_shape(chosen)[:2]) < math.prod(_shape(s)[:2])
    assert step_seconds(chosen) <= step_seconds(s)  # (the tiny model's step is the GPU's floor a layer either way)
    assert estimate_settings(chosen, budget=None, advise=False).total < estimate_settings(s, budget=None,
                                                                                         advise=False).total
    apply(module, dm, None, s, dataclasses.replace(s, share_prompt=True))
    assert isinstance(dm.collator(), SharedPromptCollator)
    # a user's own choice is left alone, and an attention that cannot take the mask is never offered it
    assert "shared prompts" not in choose(dataclasses.replace(s, share_prompt_auto=False), 80 * 2**30)[1]
    flash = dataclasses.replace(s, base=ModelSpec(name_or_path=tiny_model_dir, attn_implementation="flash_attention_2"))
    assert list(_shared(flash)) == []


def test_families_that_cannot_take_the_mask_are_not_offered_it():
    from transformers import CONFIG_MAPPING

    assert shared_prompt.takes(family_config("llama", V)) and shared_prompt.takes(family_config("gemma2", V))
    assert not shared_prompt.takes(family_config("bloom", V))
    assert not shared_prompt.takes(family_config("llama", V), "flash_attention_2")
    assert not shared_prompt.takes(CONFIG_MAPPING["jamba"]())  # recurrent layers


def test_a_pair_with_nothing_to_score_is_named():
    rows = _rows([(0, 3, 0)])
    with pytest.raises(ValueError, match="pair of line 1 has an empty side and no prompt"):
        SharedPromptCollator(0)(rows)


def test_a_config_with_chunked_layers_is_refused_before_any_forward():
    model = _model("llama", "sdpa")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ConfigError, match="data.share_prompt: llama has layers other than full or sliding attention"):
        shared_prompt.check(model)


def test_the_step_model_weighs_the_longer_rows_attention_against_the_prompts_saved(monkeypatch):
    """One shared row of P + C + R tokens computes its whole attention square (an additive mask), two rows of P + C
    and P + R half of theirs (causal): with long prompts the tokens saved win, with short prompts and long responses
    the attention lost does, and `auto` shares only in the first case."""
    import dataclasses

    from lit_ft.plan import Settings, auto
    from lit_ft.plan.rows import RowStats
    from tests.test_hostile import BASE

    monkeypatch.setitem(auto.RATES, "cuda", dict(auto.RATES["cuda"], layer_s=0.0, step_s=0.0, layer_gpu_s=0.0))

    def settings(prompt, response):
        data = RowStats(prompt + response, None, (response,) * 16, (prompt + response,) * 16, padded=False,
                        units=(prompt + 2 * response,) * 8, kind="pair side")
        return Settings(stage="dpo", base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4), optim=OptimSpec(),
                        dpo=DPOSpec(), max_length=8192, batch_size=8, target="cuda", data=data,
                        share_prompt_auto=True)

    for prompt, response, shares in ((2048, 64, True), (16, 4096, False)):
        s = settings(prompt, response)
        shared = dataclasses.replace(s, share_prompt=True)
        assert (auto.step_seconds(shared) < auto.step_seconds(s)) == shares, (prompt, response)
        assert auto.choose(s, 2**50)[0].share_prompt == shares
