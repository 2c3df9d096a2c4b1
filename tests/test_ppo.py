"""PPOModule on a tiny random Llama: KL, masking, guards, early stop, adapter roles, resume, learning, 4-bit."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lit_ft.online.generation import SamplingSpec
from lit_ft.models import ALL_PROJECTIONS, LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.callbacks.plots import MetricsPlot
from lit_ft.stages.ppo import PPOModule, PPOSpec, Rollout

MAX_NEW = 8
QUESTIONS = ["What is 12 plus 30?", "hello there", "Add the numbers.", "the quick brown fox", "reward model",
             "how can I help you", "question answer", "The lazy dog"]


def uppercase_share(prompts, responses, answers):
    """Programmatic reward: upper-case letters per sampled token (about 0.1 for the random tiny model)."""
    return [min(1.0, sum(c.isascii() and c.isupper() for c in r) / MAX_NEW) for r in responses]


def uppercase_reward(prompts, responses, answers):
    """`uppercase_share` on a 0..2 scale: with beta = 0.1 the KL-regularised optimum (p ~ p_ref * exp(r / beta)
    per token) has a share of about 0.6 at a KL of about 0.7 nats per token (5.5 per 8-token response)."""
    return [2.0 * s for s in uppercase_share(prompts, responses, answers)]


def nan_reward(prompts, responses, answers):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def prompt_loader(tokenizer, batch_size=8, n=32, seed=0):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           tokenize=False, add_generation_prompt=True) for i in range(n)]

    def collate(rows):
        enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "prompts": rows,
                "answers": [None] * len(rows)}

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(texts, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=g)


def make_module(model_dir, ppo=None, lr=1e-3, reward_fn="tests.test_ppo.uppercase_share", **kw):
    kw.setdefault("lora", LoraSpec(r=8, alpha=16, dropout=0.1))
    return PPOModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), reward_fn=reward_fn,
                     sampling=SamplingSpec(max_new_tokens=MAX_NEW), ppo=ppo or PPOSpec(mini_batch_size=4, ppo_epochs=2),
                     optim=OptimSpec(lr=lr, scheduler="constant", warmup_ratio=0.0), sample_table_every=0, **kw)


def trainer(rollouts, epochs=1, **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=rollouts, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def params(module, *fragments):
    return {n: p.detach().clone() for n, p in module.named_parameters() if any(f in n for f in fragments)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread avoids spinning threads (100x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """An SFT adapter and a reward export (SEQ_CLS LoRA + score head + normalization) with non-zero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM"))
    rm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    for m in (sft, rm):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    sft.save_pretrained(root / "sft")
    rm.save_pretrained(root / "reward")
    (root / "reward" / "reward_normalization.json").write_text(json.dumps({"gain": 2.0, "bias": -0.5}))
    return str(root / "sft"), str(root / "reward")


def test_kl_is_exactly_zero_when_policy_equals_reference(tiny_model_dir, tokenizer, adapters):
    for sft in (None, adapters[0]):  # new LoRA vs disabled adapters; SFT copy vs frozen SFT adapter
        module = make_module(tiny_model_dir, sft_adapter=sft)
        module.configure_model()
        batch = next(iter(prompt_loader(tokenizer)))
        ro = module.rollout(batch, module.sampling)
        module.evaluate_rollout(ro)
        assert torch.equal(ro.old_logprobs, ro.ref_logprobs)
        assert bool(ro.mask.any())


def test_post_eos_tokens_carry_no_loss(tiny_model_dir, tokenizer, adapters):
    from lit_ft.losses import ppo_policy_loss, ppo_value_loss, response_mask_after_eos

    module = make_module(tiny_model_dir, sft_adapter=adapters[0], reward_adapter=adapters[1])
    module.configure_model()
    batch = next(iter(prompt_loader(tokenizer)))
    eos = tokenizer.eos_token_id
    responses = torch.randint(3, len(tokenizer), (8, MAX_NEW))
    responses[:, 3] = eos
    mask = response_mask_after_eos(responses, eos, eos).long()
    garbage = responses.clone()
    garbage[:, 4:] = torch.randint(3, len(tokenizer), (8, MAX_NEW - 4))
    losses = []
    for resp in (responses, garbage):
        ro = Rollout(batch["input_ids"], batch["attention_mask"], resp, mask)
        module.evaluate_rollout(ro)
        ro.advantages, ro.returns = torch.linspace(-1, 1, 8 * MAX_NEW).view(8, MAX_NEW) * mask, mask * 0.5
        with torch.no_grad():
            logprobs = module.policy_forward(ro)[0]
            pg, _ = ppo_policy_loss(logprobs + 0.01, ro.old_logprobs, ro.advantages, mask, 0.2)
            vf, _ = ppo_value_loss(ro.values + 0.3, ro.values, ro.returns, mask, 0.2)
        scores = module.score(batch, ro)[0]
        losses.append(torch.stack([pg, vf, *scores]))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)


def test_trainable_adapters_change_frozen_ones_do_not(tiny_model_dir, tokenizer, adapters):
    module = make_module(tiny_model_dir, sft_adapter=adapters[0], reward_adapter=adapters[1])
    module.configure_model()
    before = params(module, "lora_", "value_head", "reward_head", "embed_tokens", "q_proj.base_layer")
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    after = params(module, "lora_", "value_head", "reward_head", "embed_tokens", "q_proj.base_layer")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for role in (".policy.", ".value.", "value_head"):
        assert any(role in n for n in changed), f"{role} did not train"
    for role in (".ref.", ".reward.", "reward_head", "embed_tokens", "base_layer"):
        assert not any(role in n for n in changed), f"{role} changed"
    assert module.trainer.callback_metrics["ppo/skipped_minibatches"] == 0
    assert "objective/reward_model" in module.trainer.callback_metrics


def test_ratio_guard_skips_minibatches(tiny_model_dir, tokenizer):
    module = make_module(tiny_model_dir, ppo=PPOSpec(mini_batch_size=4, ppo_epochs=2, ratio_threshold=0.5))
    module.configure_model()
    before = params(module, ".policy.")
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert module.trainer.callback_metrics["ppo/skipped_minibatches"] == 4  # 2 epochs x 2 minibatches, all ratios ~1
    assert all(torch.equal(before[n], p) for n, p in params(module, ".policy.").items())


def test_nan_scores_skip_the_batch(tiny_model_dir, tokenizer):
    module = make_module(tiny_model_dir, reward_fn="tests.test_ppo.nan_reward")
    module.configure_model()
    before = params(module, ".policy.", ".value.", "value_head")
    trainer(2).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert module.counters["skipped_batches"] == 2
    assert all(torch.equal(before[n], p) for n, p in params(module, ".policy.", ".value.", "value_head").items())


@pytest.mark.parametrize("target_kl, epochs", [(None, 4), (1e-9, 1)])
def test_target_kl_early_stop(tiny_model_dir, tokenizer, target_kl, epochs):
    module = make_module(tiny_model_dir, lr=1e-2, ppo=PPOSpec(mini_batch_size=4, ppo_epochs=4, target_kl=target_kl))
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert module.trainer.callback_metrics["ppo/epochs"] == epochs


def test_resume_restores_kl_controller_and_adapters(tiny_model_dir, tokenizer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    spec = PPOSpec(mini_batch_size=4, ppo_epochs=1, init_kl_coef=0.2, target=0.001, horizon=20.0)
    module = make_module(tiny_model_dir, ppo=spec)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(2, enable_checkpointing=True, callbacks=[ckpt]).fit(module, train_dataloaders=prompt_loader(tokenizer))
    saved_coef, saved = module.kl_ctl.value, params(module, ".policy.", ".value.", "value_head")
    assert saved_coef != pytest.approx(0.2)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert all(".ref." not in k and "base_layer" not in k and "embed" not in k for k in state["state_dict"])

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["coef"] = pl_module.kl_ctl.value
            seen["params"] = params(pl_module, ".policy.", ".value.", "value_head")

    fresh = make_module(tiny_model_dir, ppo=spec)
    trainer(2, epochs=2, callbacks=[Probe()]).fit(fresh, train_dataloaders=prompt_loader(tokenizer),
                                                  ckpt_path=str(tmp_path / "last.ckpt"))
    assert seen["coef"] == saved_coef
    assert saved.keys() == seen["params"].keys()
    assert all(torch.equal(saved[n], seen["params"][n]) for n in saved)


def test_learns_programmatic_reward_with_bounded_kl(tiny_model_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=ALL_PROJECTIONS + ["lm_head"])
    ppo = PPOSpec(mini_batch_size=8, ppo_epochs=4, init_kl_coef=0.1, adaptive_kl=False)
    module = make_module(tiny_model_dir, ppo=ppo, lr=1e-2, lora=lora, value_model="shared_trunk",
                         reward_fn="tests.test_ppo.uppercase_reward")
    plot = MetricsPlot(path=str(tmp_path / "metrics.png"))
    trainer(40, epochs=1, callbacks=[plot]).fit(module, train_dataloaders=prompt_loader(tokenizer, 16, 16 * 40))
    scores = [v / 2 for _, v in plot.history["objective/scores"]]
    kls = [v for _, v in plot.history["objective/kl"]]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert max(kls) < 16.0  # under 3x the regularised optimum (about 5.5 nats): the penalty holds the policy
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_save_adapter_is_peft_loadable(tiny_model_dir, tokenizer, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = make_module(tiny_model_dir, sft_adapter=adapters[0], reward_adapter=adapters[1])
    module.configure_model()
    module.save_adapter(tmp_path / "out", tokenizer)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "out"))
    ours = {n.replace(".policy.", "."): p for n, p in module.model.named_parameters() if ".policy." in n}
    theirs = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert (tmp_path / "out" / "value" / "adapter_model.safetensors").exists()
    from lit_ft.models.adapters import read_base_identity

    assert read_base_identity(tmp_path / "out") == module.base.identity()


def test_4bit_base_runs_one_iteration(tiny_model_dir, tokenizer):
    pytest.importorskip("bitsandbytes")
    module = PPOModule(base=ModelSpec(name_or_path=tiny_model_dir, quantization="nf4", compute_dtype="float32"),
                       lora=LoraSpec(r=4, alpha=8), reward_fn="tests.test_ppo.uppercase_share",
                       sampling=SamplingSpec(max_new_tokens=4), ppo=PPOSpec(mini_batch_size=4, ppo_epochs=1),
                       sample_table_every=0)
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert torch.isfinite(module.trainer.callback_metrics["ppo/loss/policy"])


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _RSSProbe(L.Callback):
    def __init__(self):
        self.rss: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rss.append(_rss_mib())


def test_200_iterations_keep_memory_flat(tiny_model_dir, tokenizer):
    """No state grows with the number of rollouts (stats, graphs, tables): resident memory after 200 small PPO
    iterations stays where it was after the first 50 (allocator noise aside)."""
    probe = _RSSProbe()
    module = make_module(tiny_model_dir, ppo=PPOSpec(mini_batch_size=4, ppo_epochs=1))
    trainer(200, callbacks=[probe]).fit(module, train_dataloaders=prompt_loader(tokenizer, 4, 4 * 200))
    assert len(probe.rss) == 200
    settled, end = probe.rss[49], probe.rss[-1]
    assert end - settled < 25.0, f"RSS grew {end - settled:.1f} MiB from iteration 50 to 200"


SEEN: list[tuple[list, list, list]] = []


def recording_reward(prompts, responses, answers):
    SEEN.append((list(prompts), list(responses), list(answers)))
    return [0.0] * len(responses)


def test_repeat_prompts_keeps_rows_together():
    from lit_ft.online.batch import repeat_prompts

    batch = {"input_ids": torch.tensor([[0, 1], [2, 3]]), "attention_mask": torch.tensor([[0, 1], [1, 1]]),
             "prompts": ["a", "b"], "answers": ["1", None]}
    out = repeat_prompts(batch, 3)
    assert out["input_ids"].tolist() == [[0, 1]] * 3 + [[2, 3]] * 3
    assert out["attention_mask"].tolist() == [[0, 1]] * 3 + [[1, 1]] * 3
    assert out["prompts"] == ["a"] * 3 + ["b"] * 3 and out["answers"] == ["1"] * 3 + [None] * 3
    assert repeat_prompts(batch, 1) is batch


def test_samples_per_prompt_rolls_out_each_prompt_k_times(tiny_model_dir, tokenizer):
    SEEN.clear()
    module = make_module(tiny_model_dir, reward_fn="tests.test_ppo.recording_reward",
                         ppo=PPOSpec(mini_batch_size=6, ppo_epochs=1, samples_per_prompt=3))
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer, batch_size=4))
    (prompts, responses, answers), = SEEN
    assert len(prompts) == len(responses) == len(answers) == 12
    assert all(prompts[i] == prompts[i - i % 3] for i in range(12))  # each prompt's 3 episodes side by side
    assert len({prompts[i] for i in range(0, 12, 3)}) > 1
    # the 3 responses of a prompt are separate samples: a random model does not repeat its 8-token answers
    assert sum(len(set(responses[i : i + 3])) for i in range(0, 12, 3)) > 4


def test_samples_per_prompt_must_be_positive(tiny_model_dir):
    from lit_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.ppo.samples_per_prompt=0: expected an integer >= 1"):
        make_module(tiny_model_dir, ppo=PPOSpec(samples_per_prompt=0))


def test_validation_logs_the_score_parts_and_prints_the_sanity_check(tiny_model_dir, tokenizer, caplog):
    """Held-out greedy responses: val/scores and its parts (val/reward_fn, val/no_eos); the sanity check's
    validation is printed too (the before-training figure) and the parts add up to the score."""
    import logging

    from lit_ft.callbacks import PrintMetrics

    module = make_module(tiny_model_dir, reward_fn="tests.test_ppo.uppercase_reward", reward_fn_weight=0.5,
                         ppo=PPOSpec(mini_batch_size=4, ppo_epochs=1, missing_eos_penalty=0.25))
    t = trainer(1, num_sanity_val_steps=1, limit_val_batches=1, callbacks=[PrintMetrics()])
    with caplog.at_level(logging.INFO):
        t.fit(module, train_dataloaders=prompt_loader(tokenizer), val_dataloaders=prompt_loader(tokenizer, seed=1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[validation")]
    assert lines[0].startswith("[validation (sanity check, 1 batches) step 0] ") and len(lines) == 2
    m = t.callback_metrics
    assert {"val/scores", "val/reward_fn", "val/no_eos"} <= set(m) and "val/reward_model" not in m
    assert torch.allclose(m["val/scores"], 0.5 * m["val/reward_fn"] - 0.25 * m["val/no_eos"])
    assert 0 < float(m["val/no_eos"]) <= 1  # a random tiny model rarely stops within 8 tokens


@pytest.mark.parametrize("engine, correction", [("hf", "mis"), ("static", "tis")])
def test_rollout_mismatch_is_logged_and_corrected(tiny_model_dir, tokenizer, adapters, engine, correction):
    """PPO logs the sampler/trainer mismatch of every rollout (fp32, eager, no merged copy: float rounding only,
    max |diff| < 1e-5) and weighs the policy loss by the correction (every weight 1 here), the value loss not."""
    module = make_module(tiny_model_dir, sft_adapter=adapters[0],
                         ppo=PPOSpec(mini_batch_size=4, ppo_epochs=2, rollout_correction=correction))
    module.sampling = SamplingSpec(max_new_tokens=MAX_NEW, engine=engine)
    module.configure_model()
    before = params(module, ".policy.")
    torch.manual_seed(0)
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert module.sampler.choice == engine
    assert float(m["rollout/logprob_diff_max"]) < 1e-5 and abs(float(m["rollout/kl_sampler_train"])) < 1e-4
    assert float(m["rollout/correction_weight_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["rollout/correction_masked_frac"]) == 0.0 and torch.isfinite(m["ppo/loss/value"])
    assert any(not torch.equal(before[n], p) for n, p in params(module, ".policy.").items())


def test_the_roles_switch_leaves_what_peft_set_adapter_leaves(tiny_model_dir):
    """`AdapterRoles._switch` sets the active adapter on PEFT's layers directly (PEFT's `set_adapter` walks every
    module and flips requires_grad, which the roles undo): after every switch of a sequence, the same active
    adapter on every LoRA layer and modules_to_save wrapper, the same requires_grad flags and the same outputs as
    PEFT's own `set_adapter` followed by the roles' flags."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
    from transformers import AutoModelForCausalLM

    from lit_ft.online import roles

    torch.manual_seed(0)
    ours = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="policy")
    ours.add_adapter("value", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                         modules_to_save=["lm_head"]))
    ours.add_adapter("ref", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_way = copy.deepcopy(ours)
    switch = roles.AdapterRoles(ours, ["policy", "value"])
    reference = roles.AdapterRoles(peft_way, ["policy", "value"])
    ids = torch.randint(3, 50, (2, 7))

    def state(model):
        layers = [(n, tuple(m.active_adapters)) for n, m in model.named_modules()
                  if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        return model.active_adapter, layers, [(n, p.requires_grad) for n, p in model.named_parameters()]

    for fast in (True, False):  # the direct switch, then PEFT's own where its internals are not the known ones
        switch._adapter_modules()
        switch._fast = fast
        for role in ["value", "ref", "policy", "value", "value", "policy", "ref"]:
            switch._switch(role)
            peft_way.set_adapter(role)
            reference.restore_flags()
            assert state(ours) == state(peft_way), (role, fast)
            with torch.no_grad():
                torch.testing.assert_close(ours(input_ids=ids).logits, peft_way(input_ids=ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="Adapter nope not found"):
            switch._switch("nope")
    switch._modules_key = None
    assert switch._adapter_modules() and switch._fast  # this PEFT: the direct switch


@pytest.mark.parametrize("stage", ["ppo", "grpo", "distill"])
def test_compile_runs_the_update_compiled_and_every_no_grad_pass_eagerly(tiny_model_dir, tokenizer, monkeypatch,
                                                                          stage):
    """`compile: true`: the same adapters after a rollout as the eager run (AOTAutograd's graphs with eager kernels
    on the CPU, `aot_eager`), graphs made by the update's gradient passes only: a no-grad pass (rollouts, scoring,
    the log-prob passes) compiles nothing."""
    import functools

    from torch._dynamo.testing import CompileCounterWithBackend

    from lit_ft.models import compile_gradient_passes
    from lit_ft.online import shared
    from lit_ft.stages.distill import DistillModule, DistillSpec
    from lit_ft.stages.grpo import GRPOModule, GRPOSpec

    counter, grad_modes = CompileCounterWithBackend("aot_eager"), []

    def backend(gm, inputs):  # dynamo compiles a frame for the call that first runs it: note that call's grad mode
        grad_modes.append(torch.is_grad_enabled())
        return counter(gm, inputs)

    monkeypatch.setattr(shared, "compile_gradient_passes", functools.partial(compile_gradient_passes, backend=backend))

    def run(compile: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        lora = LoraSpec(r=8, alpha=16, dropout=0.0)
        if stage == "ppo":
            module = make_module(tiny_model_dir, lora=lora, compile=compile)
        elif stage == "distill":
            module = DistillModule(base=ModelSpec(name_or_path=tiny_model_dir, dtype="float32"), lora=lora,
                                   teacher=ModelSpec(name_or_path=tiny_model_dir, dtype="float32"),
                                   sampling=SamplingSpec(max_new_tokens=MAX_NEW), sample_table_every=0,
                                   distill=DistillSpec(mini_batch_size=4), compile=compile,
                                   optim=OptimSpec(lr=1e-3, scheduler="constant", warmup_ratio=0.0))
        else:
            module = GRPOModule(base=ModelSpec(name_or_path=tiny_model_dir, dtype="float32"), lora=lora,
                                reward_fn="tests.test_ppo.uppercase_share", grpo=GRPOSpec(samples_per_prompt=2),
                                sampling=SamplingSpec(max_new_tokens=MAX_NEW), sample_table_every=0, compile=compile,
                                optim=OptimSpec(lr=1e-3, scheduler="constant", warmup_ratio=0.0))
        trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer, batch_size=4))
        return module, params(module, "lora_", "value_head")

    _, eager = run(False)
    assert counter.frame_count == 0
    module, compiled = run(True)
    assert counter.frame_count >= 1 and all(grad_modes)  # the update's passes went through torch.compile, only they
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # a no-grad pass over the model compiles nothing (it runs the eager layers)
        module.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(grad_modes)


def test_gradient_pass_compiling_serves_every_layer_and_length_and_copies_with_the_model(tiny_model_dir):
    """`compile_gradient_passes`: one set of graphs for all the layers and every length (dynamic shapes: rollouts of
    other lengths do not recompile), none for a no-grad pass; a deep copy's layers run the copy's weights, and the
    model pickles."""
    import copy
    import pickle

    from torch._dynamo.testing import CompileCounterWithBackend
    from transformers import AutoModelForCausalLM

    from lit_ft.models import compile_gradient_passes

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert compile_gradient_passes(model, backend=counter) == model.config.num_hidden_layers >= 2
    compile_gradient_passes(model, backend=counter)  # asked twice: still one dispatcher a layer, not nested
    assert all(layer.forward.forward is None for layer in model.model.layers)
    counts = []
    for length in (5, 9, 14):
        ids = torch.randint(0, 100, (2, length))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        counts.append(counter.frame_count)
    assert counts[0] >= 1 and counts == [counts[0]] * 3
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    assert counter.frame_count == counts[0]
    twin = copy.deepcopy(model)
    assert all(layer.forward.layer is layer for layer in twin.model.layers)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
        assert not torch.allclose(twin(input_ids=ids, use_cache=False).logits, want)
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want)
    again = pickle.loads(pickle.dumps(model))
    assert all(layer.forward.layer is layer for layer in again.model.layers)
