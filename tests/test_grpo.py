"""GRPOModule on a tiny random Llama: settings, roles, TRL's metric names, dynamic sampling, learning, export.
The estimators and losses against hand-derived numbers: tests/test_rl.py; exact resume: tests/test_resume.py;
DDP: tests/test_ddp.py."""

from __future__ import annotations

import pytest
import torch

from lit_ft.errors import ConfigError
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.grpo import GRPOModule
from lit_ft.stages.grpo_spec import GRPOSpec
from lit_ft.models import ALL_PROJECTIONS, LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.callbacks.plots import MetricsPlot
from tests.test_ppo import MAX_NEW, adapters, one_thread, params, prompt_loader, tokenizer, trainer  # noqa: F401

TRL_NAMES = ("train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/kl", "train/clip_ratio/low_mean",
             "train/clip_ratio/high_mean", "train/clip_ratio/region_mean", "train/completions/mean_length",
             "train/entropy", "train/loss")


def make_module(model_dir, grpo=None, lr=1e-3, reward_fn="tests.test_ppo.uppercase_share", **kw):
    kw.setdefault("lora", LoraSpec(r=8, alpha=16, dropout=0.1))
    return GRPOModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), reward_fn=reward_fn,
                      sampling=SamplingSpec(max_new_tokens=MAX_NEW),
                      grpo=grpo or GRPOSpec(samples_per_prompt=4, mini_batch_size=8),
                      optim=OptimSpec(lr=lr, scheduler="constant", warmup_ratio=0.0), sample_table_every=0, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"samples_per_prompt": 1}, "model.grpo.samples_per_prompt=1: advantage grpo needs at least 2"),
    ({"samples_per_prompt": 1, "advantage": "rloo"}, "advantage rloo needs at least 2"),
    ({"samples_per_prompt": 1, "advantage": "reinforce_pp", "dynamic_sampling": True}, "dynamic_sampling needs"),
    ({"cliprange_low": 1.0}, "model.grpo.cliprange_low=1.0: expected a number in [0, 1)"),
    ({"beta": -0.1}, "model.grpo.beta=-0.1: expected a number >= 0"),
    ({"advantage": "gae"}, "model.grpo.advantage='gae': expected one of ['grpo', 'dr_grpo', 'rloo', 'reinforce_pp']"),
    ({"loss_aggregation": "mean"}, "model.grpo.loss_aggregation='mean'"),
    ({"num_iterations": 0}, "model.grpo.num_iterations=0: expected an integer >= 1"),
    ({"importance_sampling_level": "seq"}, "model.grpo.importance_sampling_level='seq': expected one of"),
    ({"policy_loss": "ppo"}, "model.grpo.policy_loss='ppo': expected one of ['clip', 'cispo']"),
    ({"cispo_ratio_min": 6.0}, "model.grpo.cispo_ratio_min=6.0: expected below model.grpo.cispo_ratio_max=5.0"),
    ({"rollout_correction_cap": 0.5}, "model.grpo.rollout_correction_cap=0.5: expected a number > 1"),
    ({"rollout_correction": "is"}, "model.grpo.rollout_correction='is': expected one of ['none', 'tis', 'mis']"),
])
def test_bad_settings_name_the_key(kw, message):
    with pytest.raises(ConfigError) as info:
        GRPOSpec(**kw)
    assert message in str(info.value)


def test_module_settings(tiny_model_dir):
    GRPOSpec(), GRPOSpec(samples_per_prompt=1, advantage="reinforce_pp")  # valid
    with pytest.raises(ConfigError, match=r"model.grpo.overlong_buffer=9: expected at most model.sampling"):
        make_module(tiny_model_dir, grpo=GRPOSpec(overlong_buffer=MAX_NEW + 1))
    with pytest.raises(ValueError, match="GRPOModule needs a reward"):
        make_module(tiny_model_dir, reward_fn=None)


def test_only_the_policy_trains_and_metrics_have_trl_names(tiny_model_dir, tokenizer, adapters):
    module = make_module(tiny_model_dir, sft_adapter=adapters[0], grpo=GRPOSpec(samples_per_prompt=4,
                         mini_batch_size=8, beta=0.04, num_iterations=2))
    module.configure_model()
    assert not module.roles.has_value_adapter and sorted(module.model.peft_config) == ["policy", "ref"]
    ro = module.rollout(next(iter(prompt_loader(tokenizer))), module.sampling)
    from lit_ft.online import shared as online

    online.old_and_ref_logprobs(module, ro, 8)
    assert torch.equal(ro.old_logprobs, ro.ref_logprobs)  # the policy starts as the reference
    before = params(module, "lora_", "embed_tokens", "base_layer")
    trainer(2).fit(module, train_dataloaders=prompt_loader(tokenizer))
    after = params(module, "lora_", "embed_tokens", "base_layer")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".policy." in n for n in changed)
    assert not any(".ref." in n or "embed" in n or "base_layer" in n for n in changed)
    m = module.trainer.callback_metrics
    assert set(TRL_NAMES) <= set(m), set(TRL_NAMES) - set(m)
    assert float(m["train/kl"]) > 0  # after the first rollout's updates the policy has left the reference
    assert module.trainer.global_step == 2 * 2 * 4  # rollouts x iterations x (8 prompts x 4 / 8 rows)


@pytest.mark.parametrize("mbs, ga, log_kl, policy_pass, kl", [
    (32, 1, False, False, False),  # 8 prompts x 4 = 32 rows: one optimizer step a rollout, on-policy; TRL at beta 0
    (32, 1, True, False, True),    # the reference pass only for the logged KL
    (8, 4, True, False, True),     # 4 minibatches accumulated into one step: still on-policy
    (8, 1, True, True, True),      # 4 steps a rollout: steps after the first need the rollout policy's log-probs
])
def test_no_grad_passes_run_only_where_needed(tiny_model_dir, tokenizer, adapters, monkeypatch, mbs, ga, log_kl,
                                              policy_pass, kl):
    from lit_ft.online import shared as online

    calls, real = [], online.old_and_ref_logprobs
    monkeypatch.setattr(online, "old_and_ref_logprobs", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    module = make_module(tiny_model_dir, sft_adapter=adapters[0],
                         grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=mbs, gradient_accumulation_steps=ga,
                                       log_kl=log_kl))
    trainer(2).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert calls == [{"policy": policy_pass, "reference": kl}] * 2
    m = module.trainer.callback_metrics
    assert ("train/kl" in m) == kl and float(m["train/entropy"]) > 0  # entropy from the update when not separate
    assert module.trainer.global_step == 2 * 32 // mbs // ga


def test_detached_old_logprobs_give_the_separate_pass_gradient(tiny_model_dir, tokenizer, adapters):
    """The on-policy shortcut (old log-probs = the update's own, detached) against a separate no-grad pass of the
    same policy: the same loss value (ratio 1) and the same gradient of every policy weight."""
    from lit_ft.online import shared as online

    module = make_module(tiny_model_dir, sft_adapter=adapters[0], grpo=GRPOSpec(samples_per_prompt=4,
                         mini_batch_size=32, log_kl=False))
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    torch.manual_seed(1)
    ro = module.rollout(next(iter(prompt_loader(tokenizer))), module.sampling)
    ro.advantages = torch.randn(len(ro.mask))
    grads = []
    for separate in (True, False):
        if separate:
            online.old_and_ref_logprobs(module, ro, 8, reference=False)
        mb = ro.rows(torch.arange(len(ro.mask)))
        if not separate:
            mb.old_logprobs = None
        module.zero_grad(set_to_none=True)
        stats = module.minibatch_step(mb, torch.tensor(1.0))
        assert float(stats["train/clip_ratio/region_mean"]) == 0.0  # ratio 1 either way
        grads.append((stats["train/loss"], {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    assert ga and set(ga) == set(gb) and all(".policy." in n for n in ga)
    torch.testing.assert_close(loss_a, loss_b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


SEEN: list[tuple[list, list]] = []


def half_constant_reward(prompts, responses, answers):
    """Half the prompts score a constant (groups of equal rewards); the rest a value of the text (all differ)."""
    values = [0.5 if ("hello" in p or "fox" in p or "dog" in p or "help" in p) else sum(map(ord, r)) % 97 / 97
              for p, r in zip(prompts, responses)]
    SEEN.append((list(prompts), values))
    return values


class RowCounting(GRPOModule):
    """Counts the rows that reach the loss."""

    rows = 0

    def minibatch_step(self, mb, scale):
        RowCounting.rows += len(mb.mask)
        return super().minibatch_step(mb, scale)


def test_dynamic_sampling_counts_add_up(tiny_model_dir, tokenizer):
    SEEN.clear()
    RowCounting.rows = 0
    k, rollouts, iterations = 3, 3, 2
    module = RowCounting(base=ModelSpec(name_or_path=tiny_model_dir, dtype="float32"),
                         lora=LoraSpec(r=4, alpha=8), reward_fn="tests.test_grpo.half_constant_reward",
                         sampling=SamplingSpec(max_new_tokens=MAX_NEW), sample_table_every=0,
                         grpo=GRPOSpec(samples_per_prompt=k, mini_batch_size=4, num_iterations=iterations,
                                       dynamic_sampling=True))
    trainer(rollouts).fit(module, train_dataloaders=prompt_loader(tokenizer, batch_size=4))
    assert len(SEEN) == rollouts
    groups = [vals[i : i + k] for _, vals in SEEN for i in range(0, len(vals), k)]
    equal = sum(len(set(g)) == 1 for g in groups)  # counted here, in plain Python
    assert 0 < equal < len(groups)
    assert module.counters["groups"] == len(groups) == rollouts * 4
    assert module.counters["dropped_groups"] == equal
    m = module.trainer.callback_metrics
    assert float(m["train/dynamic_sampling/dropped_total"]) == equal
    assert float(m["train/dynamic_sampling/groups_total"]) == len(groups)
    last = [len(set(g)) == 1 for g in groups[-4:]]
    assert float(m["train/dynamic_sampling/dropped_groups"]) == sum(last)
    assert float(m["train/dynamic_sampling/kept_groups"]) == 4 - sum(last)
    assert float(m["train/frac_reward_zero_std"]) == sum(last) / 4
    assert RowCounting.rows == iterations * k * (len(groups) - equal)  # only the kept rows reach the loss


def test_learns_a_programmatic_reward(tiny_model_dir, tokenizer, tmp_path):
    """The share of upper-case letters in 8 sampled tokens (about 0.1 for the random tiny model) rises."""
    torch.manual_seed(0)
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=ALL_PROJECTIONS + ["lm_head"])
    module = make_module(tiny_model_dir, lr=1e-2, lora=lora, reward_fn="tests.test_ppo.uppercase_share",
                         grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=16, num_iterations=1))
    plot = MetricsPlot(path=str(tmp_path / "metrics.png"), metrics=["train/reward", "train/kl"])
    trainer(30, callbacks=[plot]).fit(module, train_dataloaders=prompt_loader(tokenizer, 8, 8 * 30))
    scores = [v for _, v in plot.history["train/reward"]]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"uppercase share: first 5 rollouts {first:.3f}, last 5 {last:.3f}; "
          f"final KL {plot.history['train/kl'][-1][1]:.3f}")
    assert last > first + 0.2, (first, last)


def test_validation_and_export(tiny_model_dir, tokenizer, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = make_module(tiny_model_dir, sft_adapter=adapters[0], reward_adapter=adapters[1],
                         grpo=GRPOSpec(samples_per_prompt=2, mini_batch_size=8, missing_eos_penalty=0.25,
                                       overlong_buffer=4))
    t = trainer(1, num_sanity_val_steps=1, limit_val_batches=1)
    t.fit(module, train_dataloaders=prompt_loader(tokenizer), val_dataloaders=prompt_loader(tokenizer, seed=1))
    m = t.callback_metrics
    assert {"val/scores", "val/reward_model", "val/reward_fn", "val/no_eos", "train/rewards/overlong/mean"} <= set(m)
    assert float(m["train/rewards/overlong/mean"]) < 0  # responses near max_new_tokens lose up to a point
    module.save_adapter(tmp_path / "out", tokenizer)
    assert not (tmp_path / "out" / "value").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "out"))
    ours = {n.replace(".policy.", "."): p for n, p in module.model.named_parameters() if ".policy." in n}
    theirs = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_gsm8k_reward_reads_the_number_after_the_marks():
    from lit_ft.data.tasks import gsm8k_number, gsm8k_reward

    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_number(reference) == "72" and gsm8k_number("#### 1,200.00") == "1200"
    assert gsm8k_number("#### $-3.50") == "-3.5" and gsm8k_number("72") is None
    responses = ["24 + 48 = 72\n#### 72", "#### 70 first, no: #### 72", "the answer is 72", "#### 71", "#### 72.0"]
    assert gsm8k_reward([""] * 5, responses, [reference] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert gsm8k_reward([""], ["#### 72"], [None]) == [0.0]


def test_nan_scores_skip_the_batch(tiny_model_dir, tokenizer):
    module = make_module(tiny_model_dir, reward_fn="tests.test_ppo.nan_reward")
    module.configure_model()
    before = params(module, ".policy.")
    trainer(2).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert module.counters["skipped_batches"] == 2 and module.trainer.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in params(module, ".policy.").items())


@pytest.mark.parametrize("level, policy_loss", [("sequence", "clip"), ("token", "cispo"), ("sequence", "cispo")])
def test_gspo_and_cispo_update_the_policy_through_the_stage(tiny_model_dir, tokenizer, level, policy_loss):
    module = make_module(tiny_model_dir, reward_fn="tests.test_grpo.half_constant_reward",
                         grpo=GRPOSpec(samples_per_prompt=2, mini_batch_size=8, num_iterations=2,
                                       importance_sampling_level=level, policy_loss=policy_loss))
    module.configure_model()
    before = params(module, "lora_B")
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[n], p) for n, p in params(module, "lora_B").items())


@pytest.mark.parametrize("advantage, aggregation, k", [("dr_grpo", "constant", 2), ("rloo", "sequence_mean", 3),
                                                        ("reinforce_pp", "token_mean", 1)])
def test_every_estimator_and_aggregation_updates_the_policy(tiny_model_dir, tokenizer, advantage, aggregation, k):
    module = make_module(tiny_model_dir, reward_fn="tests.test_grpo.half_constant_reward",
                         grpo=GRPOSpec(samples_per_prompt=k, advantage=advantage, loss_aggregation=aggregation,
                                       mini_batch_size=8))
    module.configure_model()
    before = params(module, "lora_B")
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[n], p) for n, p in params(module, "lora_B").items())


def test_count_scales_make_each_step_a_token_mean_over_minibatches_and_ranks():
    """`online.count_scales` (the rule of guards.CountWeighting): summed over an optimizer step's minibatches and
    averaged over ranks (as DDP's all-reduce does), the scaled minibatch means equal the mean over every token of
    the step on every rank, with ragged token counts (early EOS) in each minibatch."""
    from types import SimpleNamespace

    from lit_ft.online.shared import count_scales

    tokens = {0: torch.tensor([8, 1, 5, 2, 7, 3]), 1: torch.tensor([2, 2, 8, 6, 1, 4])}  # rows' tokens, per rank
    sums = {0: torch.tensor([4.0, -1.0, 2.5, 0.5, 3.0, 1.0]), 1: torch.tensor([1.0, 0.0, -2.0, 3.0, 0.5, 2.0])}
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
    ga = 2  # steps: minibatches {0, 1} and {2}

    def per_step(rank):
        t = torch.stack([tokens[rank][g].sum() for g in groups]).float()
        return torch.zeros(2).index_add_(0, torch.tensor([0, 0, 1]), t)

    scaled = {}
    for rank, other in ((0, 1), (1, 0)):
        trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
            reduce=lambda t, reduce_op, other=other: t + per_step(other)))
        scales = count_scales(trainer, tokens[rank], groups, ga)
        means = [sums[rank][g].sum() / tokens[rank][g].sum() for g in groups]  # each minibatch's token mean
        scaled[rank] = [float(s * m) for s, m in zip(scales, means)]
    for step, members in ((0, [0, 1]), (1, [2])):
        ddp_mean = sum(scaled[r][j] for r in (0, 1) for j in members) / 2
        rows = torch.cat([groups[j] for j in members])
        want = sum(float(sums[r][rows].sum()) for r in (0, 1)) / sum(float(tokens[r][rows].sum()) for r in (0, 1))
        assert ddp_mean == pytest.approx(want, rel=1e-6), step


MISMATCH = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl_sampler_train")


@pytest.mark.parametrize("engine, mbs", [("hf", 32), ("hf", 8), ("static", 32)])
def test_rollout_mismatch_is_zero_when_sampler_and_trainer_compute_one_function(tiny_model_dir, tokenizer, adapters,
                                                                                engine, mbs):
    """fp32, eager, no merged copy: the sampler's log-probs (transformers' generate, or the static engine run eagerly
    on the CPU) equal the training forward's up to float rounding (max |diff| < 1e-5), against the separate old-policy
    pass (mbs 8: 4 optimizer steps) or the on-policy update's own (mbs 32: one step); `tis` then weighs every token
    by 1."""
    module = make_module(tiny_model_dir, sft_adapter=adapters[0],
                         grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=mbs, rollout_correction="tis"))
    module.sampling = SamplingSpec(max_new_tokens=MAX_NEW, temperature=0.8, engine=engine)
    torch.manual_seed(0)
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert module.sampler.choice == engine
    assert float(m["rollout/logprob_diff_max"]) < 1e-5 and float(m["rollout/logprob_diff_mean"]) < 1e-6
    assert abs(float(m["rollout/kl_sampler_train"])) < 1e-4
    assert float(m["rollout/correction_weight_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["rollout/correction_masked_frac"]) == 0.0


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
def test_rollout_mismatch_of_a_merged_bf16_copy_is_measured_and_corrected(tiny_model_dir, tokenizer, adapters,
                                                                          correction):
    """A bf16 base with `sampling.merged`: the sampler decodes W + BA rounded to bf16, the trainer W x + B(A x); the
    logged difference is bf16 rounding, far above the fp32 case's 1e-5 (on the CPU, deterministic). The corrections
    weigh the loss with weights near 1 (cap 1.001 here: some tokens lie past it, truncated or masked) and train."""
    module = make_module(tiny_model_dir, sft_adapter=adapters[0],
                         grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=8, rollout_correction=correction,
                                       rollout_correction_cap=1.001))
    module.base = ModelSpec(name_or_path=tiny_model_dir, dtype="bfloat16")
    module.sampling = SamplingSpec(max_new_tokens=MAX_NEW, merged=True)
    module.configure_model()
    before = params(module, "lora_B")
    torch.manual_seed(0)  # the sampled tokens, so the figures, are fixed
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert float(m["rollout/logprob_diff_max"]) > 1e-3 and float(m["rollout/logprob_diff_mean"]) > 1e-4
    assert ("rollout/correction_weight_mean" in m) == (correction != "none")
    if correction != "none":
        frac = float(m["rollout/correction_masked_frac"])
        assert 0 < frac < 1
        weight = float(m["rollout/correction_weight_mean"])
        assert (weight <= 1.001) if correction == "tis" else (weight < 1 - frac + 1e-2)
    assert any(not torch.equal(before[n], p) for n, p in params(module, "lora_B").items())


def test_a_correction_without_sampler_logprobs_names_the_setting(tiny_model_dir, tokenizer):
    module = make_module(tiny_model_dir, grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=8,
                                                       rollout_correction="mis"))
    module.configure_model()
    ro = module.rollout(next(iter(prompt_loader(tokenizer))), module.sampling, logprobs=False)
    assert ro.sampler_logprobs is None
    ro.advantages = torch.ones(len(ro.mask))
    with pytest.raises(ConfigError) as info:
        module.minibatch_step(ro, torch.tensor(1.0))
    assert str(info.value) == ("model.grpo.rollout_correction=mis: the rollout carries no sampler log-probs to weigh "
                               "the policy loss with (both decode engines supply them); set "
                               "model.grpo.rollout_correction: none")
