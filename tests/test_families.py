"""Every text-only causal-LM family in the installed transformers through lit_ft: default LoRA targets, the SFT
loss and PPO log-probs against the model's own forward, nf4 (layers really quantized), the reward head, the
packing check, merge and reload. Tiny random models (hidden 64, 2 layers) with realistic logit sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_ft.models import adapters, families

from lit_ft.online import roles, scoring
from lit_ft.errors import ConfigError
from lit_ft.models import LoraSpec, ModelSpec, build_model, check_lora, eval_mode
from tests.conftest import make_tokenizer
from tests.family_models import FAMILIES, make_family_model

PRESENT = [f for f in FAMILIES if f in __import__("transformers").CONFIG_MAPPING]
# transformers converts exact nn.Linear layers only: lit_ft quantizes Falcon's FalconLinear itself, so none is left.
NOT_QUANTIZED: set[str] = set()
# Families whose attention (with transformers' default implementation) ignores position_ids for packed rows.
NO_PACKING = {"opt", "bloom"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            tok = make_tokenizer(str(d))
            make_family_model(family, str(d), len(tok))
            cache[family] = str(d)
        return cache[family]

    return get


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # completion-only: the prompt is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _own_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@pytest.mark.parametrize("family", PRESENT)
def test_family_sft_logprobs_merge(family, family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_ft.cli import export
    from lit_ft.stages.sft import SFTModule

    d = family_dirs(family)
    module = SFTModule(base=ModelSpec(name_or_path=d, dtype="float32"), lora=LoraSpec(r=4, alpha=8))
    module.configure_model()
    model = module.model
    # 1. Default targets: every decoder projection, written out by hand per family; never the head or a router.
    # Leaf names, or full module names where leaves would be ambiguous (fused MoE experts: PEFT 0.22 reads a leaf
    # `down_proj` as the experts' fused parameter too); the experts themselves only with `model.lora.experts`.
    targets = model.peft_config["default"].target_modules
    assert {t.rsplit(".", 1)[-1] for t in targets} == FAMILIES[family][1]
    assert len(targets) in (len(FAMILIES[family][1]), len(FAMILIES[family][1]) * model.config.num_hidden_layers)
    assert not model.peft_config["default"].target_parameters
    assert not any(type(m).__name__ == "ParamWrapper" for m in model.modules())
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == FAMILIES[family][1] and "lm_head" not in adapted
    # 2. SFT loss = the model's own forward(labels=...) loss (scaling, soft-capping, head bias included).
    batch = _batch(model.get_base_model().config.vocab_size)
    with eval_mode(model), torch.no_grad():
        loss_sum, n = module.token_loss(batch)
        own = model(**batch, use_cache=False).loss
        logits = _own_logits(model, batch)
    torch.testing.assert_close(loss_sum / n, own.float(), rtol=1e-5, atol=1e-5)
    # 3. PPO's per-token log-probs (and at temperature 0.7) = log_softmax of the model's own logits.
    with eval_mode(model), torch.no_grad():
        hidden = roles.trunk(model, batch["input_ids"], batch["attention_mask"], torch.arange(10).expand(2, 10))
        for temperature in (1.0, 0.7):
            lp, ent = roles.token_logprobs(model, hidden[:, :-1], batch["input_ids"][:, 1:], temperature, True)
            ref = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
            ref_lp = ref.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            keep = batch["attention_mask"][:, 1:].bool()
            torch.testing.assert_close(lp[keep], ref_lp[keep], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ent[keep], -(ref.exp() * ref).sum(-1)[keep], rtol=1e-4, atol=1e-4)
    # 4. One SFT step moves the adapter and lowers the loss on the batch.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_sum, n = module.token_loss(batch)
    (loss_sum / n).backward()
    opt.step()
    with eval_mode(model), torch.no_grad():
        after = module.token_loss(batch)
    assert float(after[0] / after[1]) < float(loss_sum / n)
    # 5. Packing: packed rows attend within their own sequence, or lit_ft refuses packing for the family.
    if family in NO_PACKING:
        with pytest.raises(ConfigError, match="packing"):
            families.check_packing(model)
    else:
        families.check_packing(model)
    # 6. Merge (auto attention) and reload: the merged model's logits equal the adapted model's.
    adapter = module.save_adapter(tmp_path / "adapter")
    merged = export.merge(adapter, tmp_path / "merged", base=d)
    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with eval_mode(model), torch.no_grad():
        torch.testing.assert_close(_own_logits(reloaded, batch), _own_logits(model, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", PRESENT)
def test_family_nf4_layers_quantized(family, family_dirs):
    from lit_ft.stages.sft import SFTModule

    spec = ModelSpec(name_or_path=family_dirs(family), dtype="float32", quantization="nf4", compute_dtype="float32")
    module = SFTModule(base=spec, lora=LoraSpec(r=4, alpha=8))
    if family in NOT_QUANTIZED:
        with pytest.raises(ConfigError, match="were not quantized"):
            module.configure_model()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MoE expert weights")
        module.configure_model()
    _, layers = families.decoder_layers(module.model)
    kinds = {type(m.base_layer).__name__ for layer in layers for m in layer.modules() if hasattr(m, "lora_A")}
    assert kinds == {"Linear4bit"}
    batch = _batch(module.model.get_base_model().config.vocab_size)
    loss_sum, n = module.token_loss(batch)
    (loss_sum / n).backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with eval_mode(module.model), torch.no_grad():  # the 4-bit model's own loss, through lit_ft's head path
        torch.testing.assert_close(module.token_loss(batch)[0] / n, module.model(**batch).loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", PRESENT)
def test_family_reward_head(family, family_dirs, tmp_path):
    from lit_ft.stages.reward import RewardModule

    d = family_dirs(family)
    module = RewardModule(base=ModelSpec(name_or_path=d, dtype="float32"), lora=LoraSpec(r=4, alpha=8),
                          normalize_on_fit_end=False)
    module.configure_model()
    batch = _batch(module.model.get_base_model().config.vocab_size)
    batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].flip(1)])
    batch["attention_mask"] = torch.cat([batch["attention_mask"]] * 2)
    decoder, head = scoring.decoder_and_head(module.model)
    with eval_mode(module.model), torch.no_grad():
        rewards = module.rewards(batch)
        # Plain reference: the head on the hidden state of each row's last real token, one row at a time.
        ref = []
        for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
            h = decoder(input_ids=ids[m.bool()][None], use_cache=False).last_hidden_state[0, -1]
            ref.append(head(h).squeeze())
    torch.testing.assert_close(rewards, torch.stack(ref).float(), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(rewards).all() and rewards.std() > 0
    # Packed padding-free (data.packing): the same rewards, or packing refused for the family.
    from lit_ft.data.collate import PackedPreferenceCollator

    seqs = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    packed = PackedPreferenceCollator(0, 64)([{"chosen_input_ids": seqs[i], "rejected_input_ids": seqs[i + 2],
                                               "prompt_length": 1, "margin": None} for i in range(2)])
    with eval_mode(module.model), torch.no_grad():
        if family in NO_PACKING:
            with pytest.raises(ConfigError, match="packing"):
                module.rewards(packed)
        else:
            torch.testing.assert_close(module.rewards(packed), rewards, rtol=1e-4, atol=1e-4)
    loss, _, _ = module.pair_loss({**batch, "margin": torch.zeros(2)})
    loss.backward()
    assert head.modules_to_save["default"].weight.grad.abs().sum() > 0
    out = module.save_adapter(tmp_path / "rm", tokenizer=None)
    scorer = scoring.RewardScorer.from_pretrained(out, base=ModelSpec(name_or_path=d, dtype="float32"))
    torch.testing.assert_close(scorer.score_ids(batch["input_ids"], batch["attention_mask"]), rewards,
                               rtol=1e-4, atol=1e-4)
    # PPO reads the same export onto the causal LM: the reward adapter + head on its trunk give the same rewards.
    export = adapters.read_reward_export(out)
    model, trainable = roles.build_roles(ModelSpec(name_or_path=d, dtype="float32"), LoraSpec(r=4), None, export,
                                         "adapter")
    head = roles.linear_head(export.head_weight.shape[1], export.head_weight, export.head_bias, trainable=False)
    switch = roles.AdapterRoles(model, trainable)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with eval_mode(model), torch.no_grad(), switch.active(roles.REWARD):
        ppo_rewards = roles.last_token_scores(head, roles.trunk(model, ids, mask, (mask.cumsum(1) - 1).clamp(min=0)), mask)
    torch.testing.assert_close(ppo_rewards, rewards, rtol=1e-4, atol=1e-4)


def test_explicit_targets_checked_against_the_model(family_dirs):
    from peft import LoraConfig, get_peft_model  # noqa: F401 (the model is the plain HF one)
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(family_dirs("gpt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GPT-2's own correct names: no Llama-name warning
        assert check_lora(LoraSpec(target_modules=["c_attn", "c_proj", "c_fc"]), gpt2) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ConfigError, match=r"'v_prj' matches no layer .*\['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        check_lora(LoraSpec(target_modules=["c_attn", "v_prj"]), gpt2)
    with pytest.warns(UserWarning, match="adapts none of the attention projections"):
        check_lora(LoraSpec(target_modules=["c_fc"]), gpt2)
    # GPT-2's c_proj is the attention output AND the MLP output: one part alone needs full module names.
    assert check_lora(LoraSpec(), gpt2) == ["c_attn", "c_proj", "c_fc"]
    attention = check_lora(LoraSpec(target_modules=["attention"]), gpt2)
    assert attention == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    mlp = build_model(ModelSpec(name_or_path=family_dirs("gpt2"), dtype="float32"), LoraSpec(target_modules=["mlp"]))
    adapted = sorted(n.split(".lora_A.")[0].split("transformer.")[1] for n, _ in mlp.named_parameters() if ".lora_A." in n)
    assert adapted == [f"h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_adapted_on_request(family, family_dirs):
    if family not in PRESENT:
        pytest.skip(f"{family} is not in this transformers")
    d = family_dirs(family)
    plain = build_model(ModelSpec(name_or_path=d, dtype="float32"), LoraSpec(r=2))
    assert not any("experts" in n for n, p in plain.named_parameters() if p.requires_grad)
    assert "NOT adapted" in families.describe_targets(plain)
    with pytest.warns(UserWarning, match="dropout 0.05 -> 0"):
        model = build_model(ModelSpec(name_or_path=d, dtype="float32"), LoraSpec(r=2, experts=True))
    cfg = model.peft_config["default"]
    assert cfg.lora_dropout == 0 and sorted(cfg.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert not any("gate.weight" in n or "router" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = _batch(model.get_base_model().config.vocab_size)
    model(**batch).loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "experts" in n]
    assert expert_grads and all(g is not None for g in expert_grads)


def test_attention_auto_and_refused_kernel(family_dirs):
    from lit_ft.models import load_base

    d = family_dirs("gemma2")
    assert load_base(ModelSpec(name_or_path=d, dtype="float32")).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa: .*does not support"):
        load_base(ModelSpec(name_or_path=d, dtype="float32", attn_implementation="sdpa"))


def test_reward_merge_of_a_family_without_sequence_classifier(family_dirs, tmp_path):
    """Granite has no *ForSequenceClassification: its merged reward model keeps lit_ft's score head, and loading
    the merged directory as a scorer reads that head back (same rewards as the adapter)."""
    from lit_ft.cli import export
    from lit_ft.models import load_base
    from lit_ft.stages.reward import RewardModule

    d = family_dirs("granite")
    module = RewardModule(base=ModelSpec(name_or_path=d, dtype="float32"), lora=LoraSpec(r=4, alpha=8),
                          normalize_on_fit_end=False)
    module.configure_model()
    assert not families.has_sequence_classifier(module.model.get_base_model().config)
    batch = _batch(module.model.get_base_model().config.vocab_size)
    loss, _, _ = module.pair_loss({**batch, "margin": torch.zeros(1)})
    loss.backward()
    torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=1.0).step()  # non-zero LoRA B
    merged = export.merge(module.save_adapter(tmp_path / "rm"), tmp_path / "merged", base=d)
    scorer = load_base(ModelSpec(name_or_path=str(merged), dtype="float32"), "score").eval()
    with eval_mode(module.model), torch.no_grad():
        want = module.rewards(batch)
        got = scoring.sequence_scores(scorer, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_layers_left_unquantized_are_refused(family_dirs):
    """int8 has no lit_ft fallback for Falcon's FalconLinear: the load says which layers stayed full precision."""
    from lit_ft.models import load_base

    with pytest.raises(ConfigError, match=r"int8: FalconForCausalLM's decoder layers \['mlp.dense_4h_to_h', "
                                          r"'mlp.dense_h_to_4h', 'self_attention.dense', 'self_attention.query_key"):
        load_base(ModelSpec(name_or_path=family_dirs("falcon"), dtype="float32", quantization="int8"))


@pytest.mark.parametrize("family", PRESENT)
def test_family_shared_prefix_generation(family, family_dirs, monkeypatch):
    """Samples of the same prompt side by side (GRPO's groups): the prefill once per distinct prompt, its cache
    repeated, gives the tokens of the plain `generate` (greedy, fp64 where the kernels allow: no float ties), left
    padding included."""
    from transformers import AutoModelForCausalLM

    from lit_ft.online import generation
    from lit_ft.online.generation import SamplingSpec, generate

    moe = family in ("granitemoe", "mixtral", "qwen2_moe", "qwen3_moe")  # grouped expert matmuls: no fp64 kernel
    model = AutoModelForCausalLM.from_pretrained(family_dirs(family), dtype=torch.float32 if moe else torch.float64)
    model.eval()
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(3, 100, (9,), generator=g), torch.randint(3, 100, (5,), generator=g)
    rows = [torch.cat([torch.zeros(4, dtype=torch.long), short]), long]  # pad id 0 on the left
    ids = torch.stack([r for r in rows for _ in range(3)])
    mask = (torch.arange(9) >= 4).long().expand(6, 9).clone()
    mask[3:] = 1
    spec = SamplingSpec(max_new_tokens=6, do_sample=False)
    real, used = generation.shared_prefix_cache, []
    monkeypatch.setattr(generation, "shared_prefix_cache", lambda *a: used.append(real(*a)) or used[-1])
    with torch.no_grad():
        shared, shared_mask = generate(model, ids, mask, spec, eos_token_id=1, pad_token_id=0)
        monkeypatch.setattr(generation, "shared_prefix_cache", lambda *a: None)
        plain, plain_mask = generate(model, ids, mask, spec, eos_token_id=1, pad_token_id=0)
    if family in ("llama", "qwen2", "gpt2", "mistral"):
        assert used[0] is not None  # the families every GRPO user runs take the shared path
    assert torch.equal(shared, plain) and torch.equal(shared_mask, plain_mask)


@pytest.mark.parametrize("family", PRESENT)
def test_family_merged_decode(family, family_dirs):
    """`sampling.merged` with transformers' `generate` on every family (its LoRA targets as lit_ft picks them, GPT-2's
    Conv1D layers included): the greedy tokens of the adapted model, and afterwards the same base tensors unchanged
    and the adapters on (the next forward gives the adapted logits)."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.online.sampler import Sampler
    from lit_ft.online.engine_ops import lora_layers

    moe = family in ("granitemoe", "mixtral", "qwen2_moe", "qwen3_moe")  # grouped expert matmuls: no fp64 kernel
    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=family_dirs(family), dtype="float32"), LoraSpec(r=4, dropout=0.0))
    model = (model if moe else model.double()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    layers = lora_layers(model, "default")
    before = [(m.base_layer.weight, m.base_layer.weight.clone()) for _, m in layers]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    sampler = Sampler(model, eos_token_id=1, pad_token_id=0, adapter="default")
    plain = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="hf"))
    merged = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="hf", merged=True))
    assert layers and torch.equal(plain[0], merged[0]) and torch.equal(plain[1], merged[1])
    assert all(m.base_layer.weight is w and torch.equal(w, v) and not m.disable_adapters
               for (w, v), (_, m) in zip(before, layers))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("family", PRESENT)
def test_family_static_engine_decodes_as_generate(family, family_dirs):
    """The static decode engine (the default on CUDA) on every family it serves: its greedy tokens from ragged
    left-padded prompts, some repeated (their prefill shared), equal transformers' `generate`; merged (the policy LoRA in a copy, GPT-2's Conv1D
    included) and with its step traced by torch.compile (the `aot_eager` backend here: dynamo's graph of the step,
    cache writes and all, without inductor's C++ build) the same tokens; sliding-window layers (Mistral, Gemma 2/3:
    4096-token windows here) attend as full ones within a cache shorter than the window; the families it does not
    serve are named."""
    import torch._dynamo

    from lit_ft.online.engine import DecodeEngine
    from lit_ft.online.engine_ops import engine_unsupported
    from lit_ft.online.generation import SamplingSpec, generate

    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=family_dirs(family), dtype="float32"), LoraSpec(r=4, dropout=0.0))
    model = model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    reason = engine_unsupported(model)
    if reason is not None:
        with pytest.raises(ValueError, match="the decode engine cannot serve this model"):
            DecodeEngine(model, 1, 0, adapter="default")
        pytest.skip(f"{family}: {reason}")
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids, mask = ids[[0, 0, 1, 2, 2]], mask[[0, 0, 1, 2, 2]]  # copies of a prompt: one shared prefill
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), 1, 0, max_new_tokens=6)
    for merged, compiled in ((False, False), (True, False), (False, True)):
        engine = DecodeEngine(model, 1, 0, adapter="default", merged=merged, compile=compiled)
        if compiled:
            torch._dynamo.reset()
            engine.compiled = torch.compile(engine._forward, backend="aot_eager", dynamic=False)
        out, out_mask, _ = engine.generate(ids, mask, 6, do_sample=False)
        assert (engine.compiled is not None) == compiled, "the step fell back to eager"
        assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask), (merged, compiled)


@pytest.mark.skipif("bloom" not in PRESENT, reason="Bloom is not in this transformers")
def test_an_online_stage_refuses_the_static_engine_for_bloom_when_it_builds_its_roles(family_dirs):
    """`sampling.engine: static` on a model the engine does not serve: refused before the fit's validation."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo import GRPOModule

    module = GRPOModule(base=ModelSpec(name_or_path=family_dirs("bloom"), dtype="float32"),
                        reward_fn="tests.test_ppo.uppercase_share", sampling=SamplingSpec(engine="static"))
    with pytest.raises(ConfigError, match=r"model.sampling.engine: static cannot serve this model \(ALiBi positions"):
        module.configure_model()


@pytest.mark.parametrize("family", [f for f in ("mistral", "gemma3_text") if f in PRESENT])
def test_a_sliding_window_shorter_than_the_rollout_goes_to_generate(family, family_dirs):
    """A window shorter than prompt + new tokens (the static cache would roll over): `auto` decodes with
    transformers' `generate` (the same tokens as asking for hf), `engine: static` is refused naming the window, and a
    rollout that fits the window still takes the static engine."""
    from lit_ft.online.engine import DecodeEngine
    from lit_ft.online.sampler import Sampler
    from lit_ft.online.generation import SamplingSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=family_dirs(family), dtype="float32"), LoraSpec(r=4, dropout=0.0))
    model.get_base_model().config.sliding_window = 12
    model = model.eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    sampler = Sampler(model, eos_token_id=1, pad_token_id=0, adapter="default")
    spec = SamplingSpec(max_new_tokens=8, do_sample=False)
    auto = sampler(ids, mask, spec)
    assert sampler.choice == "hf"
    assert torch.equal(auto[0], sampler(ids, mask, SamplingSpec(max_new_tokens=8, do_sample=False, engine="hf"))[0])
    with pytest.raises(ConfigError, match=r"sampling.engine: static cannot serve this model \(a sliding window of 12 "
                                          r"tokens, shorter than the rollout's prompt \+ new tokens \(15\)"):
        sampler(ids, mask, SamplingSpec(max_new_tokens=8, do_sample=False, engine="static"))
    with pytest.raises(ValueError, match="a sliding window of 12 tokens"):
        DecodeEngine(model, 1, 0, adapter="default").generate(ids, mask, 8, do_sample=False)
    short = Sampler(model, eos_token_id=1, pad_token_id=0, adapter="default")
    fits = short(ids, mask, SamplingSpec(max_new_tokens=5, do_sample=False, engine="static"))
    assert short.choice == "static"
    assert torch.equal(fits[0], short(ids, mask, SamplingSpec(max_new_tokens=5, do_sample=False, engine="hf"))[0])


@pytest.mark.skipif("qwen2_moe" not in PRESENT, reason="Qwen2-MoE is not in this transformers")
def test_explicit_leaf_targets_leave_moe_experts_alone(family_dirs):
    """`target_modules: [q_proj, down_proj]` on a model with fused expert weights adapts the attention and the shared
    expert's `down_proj` only, with LoRA dropout on: PEFT 0.22 reads a bare `down_proj` as the experts' fused parameter
    too (and refuses dropout there), so the names go to PEFT in full; the experts take `model.lora.experts`."""
    lora = LoraSpec(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "down_proj"])
    model = build_model(ModelSpec(name_or_path=family_dirs("qwen2_moe"), dtype="float32"), lora)
    targets = model.peft_config["default"].target_modules
    assert not any(type(m).__name__ == "ParamWrapper" for m in model.modules())
    assert not model.peft_config["default"].target_parameters
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "down_proj"}
    assert all(".experts." not in t for t in targets) and any(t.endswith("shared_expert.down_proj") for t in targets)
