"""The decode engine (`lit_ft.online.engine`) against the reference path: HF `generate` and the training forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_ft.online import roles
from lit_ft.online.generation import SamplingSpec, generate
from lit_ft.online.engine import DecodeEngine
from lit_ft.online.sampler import Sampler
from lit_ft.online.engine_ops import filter_logits, lora_layers

TEXTS = ["What is 12 plus 30?", "hi", "The quick brown fox jumps over", "Add the numbers 3 and 4.", "reward"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peft_model(model_dir, seed=0, adapters=("policy",)):
    """The tiny Llama with LoRA adapters whose B is random (so each adapter changes the outputs), eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**cfg), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.set_adapter(adapters[0])
    return model.eval()


def prompts(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def mid_batch_eos(model, ids, mask, pad, n):
    """An EOS id that ends some rows of the greedy responses early and not others (taken from a first run)."""
    out, _ = generate(model, ids, mask, SamplingSpec(do_sample=False), eos_token_id=10**6, pad_token_id=pad,
                      max_new_tokens=n)
    for tok in out[0, 1:].tolist():  # a token of row 0 that some row never produces
        if not all((row == tok).any() for row in out):
            return tok
    pytest.skip("no token separates the rows")


def training_logprobs(model, ids, mask, responses, rmask, temperature):
    """The policy's training-forward log-probs of the responses (what PPO's ratios use)."""
    seq, smask, pos = roles.sequence(ids, mask, responses, rmask)
    h = roles.response_hidden(roles.trunk(model, seq, smask, pos), ids.shape[1])
    return roles.token_logprobs(model, h, responses, temperature)[0]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_greedy_equals_hf_generate_with_ragged_prompts_and_eos_mid_batch(tiny_model_dir, tiny_tokenizer, pad_is_eos):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    eos = mid_batch_eos(model, ids, mask, pad, 12)
    pad = eos if pad_is_eos else pad
    engine = DecodeEngine(model, eos, pad, check_every=3)
    for rows in (slice(None), slice(1, 4)):  # then a smaller batch with shorter prompts in the same allocation
        i, m = ids[rows], mask[rows]
        keep = m.sum(0) > 0
        i, m = i[:, keep], m[:, keep]
        ref, ref_mask = generate(model, i, m, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=12)
        out, out_mask, _ = engine.generate(i, m, 12, do_sample=False)
        assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)
        if rows == slice(None):  # rows ended at different steps (EOS in the middle of the batch)
            assert ref_mask.sum(1).min() < ref_mask.sum(1).max()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_copies_of_a_prompt_share_one_prefill(tiny_model_dir, tiny_tokenizer, pad_is_eos, monkeypatch):
    """GRPO's k copies of each prompt (side by side, as `repeat_prompts` lays them out): the prefill runs over the
    distinct prompts only, and the copies decode as if each had its own: greedy tokens equal to `generate`'s, sampled
    tokens that differ between copies with log-probs equal to the training forward's, in a static cache whose prompt
    slots equal a full prefill's."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    pad = tiny_tokenizer.pad_token_id
    eos = mid_batch_eos(model, ids, mask, pad, 10)
    pad = eos if pad_is_eos else pad
    engine = DecodeEngine(model, eos, pad)
    widths = []
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda i, *a, **k: (widths.append(i.shape), forward(i, *a, **k))[1])
    out, out_mask, _ = engine.generate(ids, mask, 10, do_sample=False)
    assert widths[0] == (len(ids) // 3, ids.shape[1])  # the prefill: one row a distinct prompt
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=10)
    assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)
    assert ref_mask.sum(1).min() < ref_mask.sum(1).max()  # rows ended at different steps
    shared = [layer.keys[:, :, :ids.shape[1]].clone() for layer in engine.cache.layers]
    monkeypatch.setattr(torch, "unique", lambda x, **k: (x, torch.arange(len(x))))  # every row its own prefill
    engine.generate(ids, mask, 10, do_sample=False)
    for layer, keys in zip(engine.cache.layers, shared):
        torch.testing.assert_close(layer.keys[:, :, :ids.shape[1]], keys, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    torch.manual_seed(3)
    responses, rmask, logp = engine.generate(ids, mask, 10, do_sample=True, temperature=0.7)
    assert not torch.equal(responses[0], responses[1]) or not torch.equal(responses[1], responses[2])
    torch.testing.assert_close(logp, training_logprobs(model, ids, mask, responses, rmask, 0.7) * rmask, atol=1e-5,
                               rtol=1e-5)


def test_the_shared_prefill_skips_layers_that_read_another_layers_cache():
    """Gemma 4's KV sharing: its last layers read an earlier layer's keys and values (their cache layers hold none);
    copies of a prompt still decode as transformers' `generate` does."""
    gemma4 = pytest.importorskip("transformers.models.gemma4")
    cfg = gemma4.Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_kv_shared_layers=2,
                                  sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 2,
                                  hidden_size_per_layer_input=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = gemma4.Gemma4ForCausalLM(cfg).eval()
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))[[0, 0, 1, 1]]
    mask = torch.ones_like(ids)
    ref = generate(model, ids, mask, SamplingSpec(do_sample=False), 1, 0, max_new_tokens=5)[0]
    out = DecodeEngine(model, 1, 0, adapter=None).generate(ids, mask, 5, do_sample=False)[0]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("merged", [False, True])
def test_sampled_logprobs_equal_training_forward(tiny_model_dir, tiny_tokenizer, merged):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    torch.manual_seed(3)
    engine = DecodeEngine(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, merged=merged)
    responses, rmask, logp = engine.generate(ids, mask, 10, do_sample=True, temperature=0.7)
    ref = training_logprobs(model, ids, mask, responses, rmask, 0.7)
    assert rmask.sum() > 10
    torch.testing.assert_close(logp, ref * rmask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_sampler_logprobs_equal_the_training_forward_in_fp32(tiny_model_dir, tiny_tokenizer, engine):
    """The sampler's log-probs of its tokens (either engine, `logprobs=True`) against the training forward's under
    the same fp32 weights: equal up to float rounding (max |diff| < 1e-5; about 1e-6 measured) when sampling with
    temperature, top-k and top-p (the log-probs are of the unfiltered tempered distribution, as the trainer's) and
    greedily; without `logprobs` the sampler returns (responses, mask) as before."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    # rows end at different steps (masked log-probs are 0); pad = EOS, as SmolLM2's: a sampled pad id would be
    # masked inside a response, unseen by the training forward's attention but seen by the sampler's
    eos = mid_batch_eos(model, ids, mask, pad, 10)
    sampler = Sampler(model, eos, eos)
    for spec in (SamplingSpec(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, engine=engine),
                 SamplingSpec(max_new_tokens=10, do_sample=False, engine=engine)):
        torch.manual_seed(3)
        responses, rmask, logp = sampler(ids, mask, spec, logprobs=True)
        assert sampler.choice == engine and rmask.sum() > 10 and bool((logp[rmask == 0] == 0).all())
        ref = training_logprobs(model, ids, mask, responses, rmask, spec.temperature) * rmask
        assert float((logp - ref).abs().max()) < 1e-5
        torch.manual_seed(3)
        assert len(sampler(ids, mask, spec)) == 2
    assert not spec.do_sample and rmask.sum(1).min() < rmask.sum(1).max()  # greedy rows ended apart


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_sampler_logprobs_of_a_merged_bf16_copy_differ_from_the_training_forward(tiny_model_dir, tiny_tokenizer,
                                                                                  engine):
    """bf16 weights with `merged`: the sampler decodes W + BA rounded to bf16 once, the trainer runs W x + B(A x);
    their log-probs of the same tokens differ by bf16 rounding (measured mean |diff| 1.6e-3, max 6e-3)."""
    model = peft_model(tiny_model_dir).to(torch.bfloat16)
    ids, mask = prompts(tiny_tokenizer)
    sampler = Sampler(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    spec = SamplingSpec(max_new_tokens=10, temperature=0.7, engine=engine, merged=True)
    responses, rmask, logp = sampler(ids, mask, spec, logprobs=True)
    ref = training_logprobs(model, ids, mask, responses, rmask, spec.temperature) * rmask
    diff = (logp - ref).abs()
    assert float(diff.max()) > 1e-3 and float(diff.sum() / rmask.sum()) > 3e-4


def test_merged_equals_unmerged(tiny_model_dir, tiny_tokenizer):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 10, do_sample=False)
    engine = DecodeEngine(model, eos, pad, merged=True)
    merged = engine.generate(ids, mask, 10, do_sample=False)
    assert torch.equal(plain[0], merged[0])
    torch.testing.assert_close(plain[2], merged[2], atol=1e-5, rtol=1e-5)
    lora_weights = sum(m.base_layer.weight.numel() for _, m in lora_layers(model, "policy"))
    assert engine.weights.nbytes == lora_weights * 4  # one fp32 copy of every LoRA-wrapped weight


@pytest.mark.parametrize("merged", [False, True])
def test_compiled_step_decodes_as_the_eager_step(tiny_model_dir, tiny_tokenizer, merged):
    """`compile=True`: the step's forward through inductor (C++ on the CPU) gives the eager engine's tokens and
    log-probs, with EOS mid-batch and ragged prompts; a second rollout reuses the compiled graph (no recompile)."""
    import torch._dynamo

    model = peft_model(tiny_model_dir, adapters=("policy", "value"))
    ids, mask = prompts(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    eos = mid_batch_eos(model, ids, mask, pad, 10)
    plain = DecodeEngine(model, eos, pad, merged=merged).generate(ids, mask, 10, do_sample=False)
    engine = DecodeEngine(model, eos, pad, merged=merged, compile=True, check_every=3)
    torch._dynamo.reset()
    out = engine.generate(ids, mask, 10, do_sample=False)
    assert engine.compiled is not None
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])
    assert out[1].sum(1).min() < out[1].sum(1).max()
    torch.testing.assert_close(out[2], plain[2], atol=1e-5, rtol=1e-5)
    model.set_adapter("value")  # another role active between rollouts: the engine switches back, no recompile
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = engine.generate(ids, mask, 10, do_sample=False)
    assert torch.equal(again[0], out[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert model.active_adapter == "value"


def test_a_step_that_fails_to_compile_decodes_eagerly(tiny_model_dir, tiny_tokenizer, caplog):
    """A backend that cannot compile the step (torch raises BackendCompilerFailed): a warning, the eager tokens."""
    def unable(gm, example_inputs):
        raise NotImplementedError("no kernel for this op")

    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 8, do_sample=False)
    engine = DecodeEngine(model, eos, pad, compile=True)
    engine.compiled = torch.compile(engine._forward, backend=unable, dynamic=False)
    with caplog.at_level("WARNING", logger="lit_ft.online.engine"):
        out = engine.generate(ids, mask, 8, do_sample=False)
    assert engine.compiled is None
    assert "torch.compile failed on this model (BackendCompilerFailed" in caplog.text
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])


def test_compile_is_unused_where_rollouts_decode_with_generate(tiny_model_dir, tiny_tokenizer, caplog):
    """`sampling.compile` with `engine: hf` (asked, or chosen by `auto`, the memory plan or multi-turn episodes):
    transformers' `generate` decodes, the same tokens, and the log says the setting is unused."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    sampler = Sampler(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    with caplog.at_level("INFO", logger="lit_ft.online.sampler"):
        out = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="hf", compile=True))
    assert sampler.choice == "hf" and sampler.engine is None
    assert "rollouts decode with the hf engine (sampling.compile unused: hf has no step to compile)" in caplog.text
    plain = generate(model, ids, mask, SamplingSpec(do_sample=False), tiny_tokenizer.eos_token_id,
                     tiny_tokenizer.pad_token_id, max_new_tokens=6)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])


def test_growing_prompts_compile_the_step_twice_at_most(tiny_model_dir, tiny_tokenizer):
    """Each longer prompt reallocates the cache; the step compiles for the first size and once more with symbolic
    sizes (not once a size, which would reach dynamo's recompile limit and silently decode eagerly)."""
    import torch._dynamo

    model = peft_model(tiny_model_dir)
    eager = DecodeEngine(model, -1, tiny_tokenizer.pad_token_id)
    engine = DecodeEngine(model, -1, tiny_tokenizer.pad_token_id, compile=True)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    for width in (4, 7, 10, 13):
        ids = torch.randint(3, len(tiny_tokenizer), (3, width), generator=g)
        mask = torch.ones_like(ids)
        out = engine.generate(ids, mask, 5, do_sample=False)
        assert torch.equal(out[0], eager.generate(ids, mask, 5, do_sample=False)[0]), width
    assert engine.shape[1] == 13 and engine.compiled is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def test_hf_engine_merged_equals_unmerged_and_puts_the_base_back(tiny_model_dir, tiny_tokenizer):
    """`sampling.merged` with transformers' generate: the same greedy tokens and sampled tokens (same seed) as the
    LoRA branches give; afterwards each base weight is the very tensor it was, its values unchanged, and the adapters
    are on again (the next forward is the adapted model's, not the merged one's plus the adapter)."""
    model = peft_model(tiny_model_dir, adapters=("policy", "reference"))
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    layers = lora_layers(model, "policy")
    before = [(m.base_layer.weight, m.base_layer.weight.data_ptr(), m.base_layer.weight.clone()) for _, m in layers]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    sampler = Sampler(model, eos, pad, adapter="policy")
    for spec in (SamplingSpec(do_sample=False, engine="hf"), SamplingSpec(temperature=0.8, engine="hf")):
        torch.manual_seed(5)
        plain = sampler(ids, mask, spec, max_new_tokens=10)
        torch.manual_seed(5)
        merged = sampler(ids, mask, SamplingSpec(**{**spec.__dict__, "merged": True}), max_new_tokens=10)
        assert torch.equal(plain[0], merged[0]) and torch.equal(plain[1], merged[1])
    assert sampler.weights is not None and sampler.weights.nbytes == sum(w.numel() * 4 for w, _, _ in before)
    for (w, ptr, values), (_, m) in zip(before, layers):
        assert m.base_layer.weight is w and w.data_ptr() == ptr and torch.equal(w, values)
        assert not m.disable_adapters
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_sample_generations_merged_scores_as_unmerged_and_skips_what_does_not_fit(tiny_model_dir, tiny_tokenizer,
                                                                                 monkeypatch):
    """SampleGenerations(merged=True): the same greedy generations as the LoRA branches give, the adapters on again
    afterwards; where the copy would take more than half the free memory, or the adapter cannot be merged (DoRA),
    it decodes unmerged and says so once."""
    import contextlib
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lit_ft.callbacks import heldout

    from lit_ft.online import engine_ops as rollout_ops

    model = peft_model(tiny_model_dir)
    rows = [(t, "42") for t in TEXTS]
    plugin = SimpleNamespace(forward_context=contextlib.nullcontext)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tiny_tokenizer, held_out_prompts=lambda n: rows[:n]),
                              strategy=SimpleNamespace(precision_plugin=plugin))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    swaps, said, swapped_in = [], [], rollout_ops.RolloutWeights.swapped_in
    monkeypatch.setattr(rollout_ops.RolloutWeights, "swapped_in", lambda self: swaps.append(1) or swapped_in(self))
    monkeypatch.setattr(heldout, "rank_zero_info", said.append)
    plain = heldout.SampleGenerations(num_prompts=5, batch_size=2, max_new_tokens=8).evaluate(trainer, module)
    assert swaps == [] and len({g for _, g, _, _ in plain[1]}) > 1
    merged = heldout.SampleGenerations(num_prompts=5, batch_size=2, max_new_tokens=8, merged=True)
    assert merged.evaluate(trainer, module) == plain and swaps == [1]
    assert all(not m.disable_adapters for _, m in lora_layers(model, "policy"))
    monkeypatch.setattr(heldout, "_free_memory", lambda m: 1000)  # far less than twice the copy
    assert merged.evaluate(trainer, module) == plain and merged.evaluate(trainer, module) == plain and swaps == [1]
    assert len(said) == 1 and said[0].startswith("SampleGenerations: merged decode skipped: its copy of the weights")
    monkeypatch.undo()
    said.clear()
    monkeypatch.setattr(heldout, "rank_zero_info", said.append)
    torch.manual_seed(0)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, use_dora=True)).eval()
    module = SimpleNamespace(model=dora, device=torch.device("cpu"))
    plain = heldout.SampleGenerations(num_prompts=5, batch_size=2, max_new_tokens=8).evaluate(trainer, module)
    assert heldout.SampleGenerations(num_prompts=5, batch_size=2, max_new_tokens=8, merged=True).evaluate(
        trainer, module) == plain
    assert len(said) == 1 and "merged decode skipped: merged rollouts do not support DoRA" in said[0]


def test_sample_generations_without_reference_answers_measures_nothing_and_says_so(tiny_tokenizer, monkeypatch):
    """Held-out prompts with no reference answer (the prompts of preference pairs): no '0.000 -> 0.000' line, one
    line saying the metric is not measured, no generation, no logged value."""
    from types import SimpleNamespace

    from lit_ft.callbacks import heldout

    said, logged = [], []
    monkeypatch.setattr(heldout, "rank_zero_info", said.append)
    monkeypatch.setattr(heldout, "score_prompts", lambda *a, **k: pytest.fail("nothing to score"))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tiny_tokenizer, held_out_prompts=lambda n: []),
                              fast_dev_run=0, sanity_checking=False, global_step=5)
    module = SimpleNamespace(model=None, device=torch.device("cpu"), log=lambda *a: logged.append(a))
    cb = heldout.SampleGenerations(num_prompts=5)
    cb.on_train_start(trainer, module)
    cb.on_validation_epoch_end(trainer, module)
    cb.on_train_end(trainer, module)
    assert said == ["SampleGenerations: no held-out prompt has a reference answer: exact_match is not measured"]
    assert logged == [] and cb.before is None


def test_merged_equals_unmerged_in_bf16(tiny_model_dir, tiny_tokenizer):
    """bf16 weights: W + BA rounded once vs W x + B(A x) in bf16; equal log-probs within bf16 rounding, over the
    prefix where the greedy tokens agree (a near-tie may flip a later token)."""
    model = peft_model(tiny_model_dir).to(torch.bfloat16)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 10, do_sample=False)
    merged = DecodeEngine(model, eos, pad, merged=True).generate(ids, mask, 10, do_sample=False)
    width = min(plain[0].shape[1], merged[0].shape[1])
    agree = (plain[0][:, :width] == merged[0][:, :width]).long().cumprod(1).bool()
    assert agree[:, 0].all() and agree.float().mean() > 0.5
    torch.testing.assert_close(plain[2][:, :width][agree], merged[2][:, :width][agree], atol=0.05, rtol=0.02)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with biases on every attention and MLP projection (a 4-bit layer's bias goes with it)."""
    from tests.conftest import make_tiny_llama

    d = tmp_path_factory.mktemp("tiny_llama_bias")
    make_tiny_llama(str(d), vocab_size=len(tiny_tokenizer), attention_bias=True, mlp_bias=True)
    tiny_tokenizer.save_pretrained(str(d))
    return str(d)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_decodes_a_4bit_base_as_the_unmerged_policy_and_puts_it_back(tiny_model_dir, biased_model_dir,
                                                                           tiny_tokenizer, bias):
    """A QLoRA policy (NF4 + double quant, fp32 compute; with and without biases): the merged copy is the
    de-quantized weights plus the LoRA delta, so both engines decode the unmerged policy's tokens; afterwards every
    layer holds its own 4-bit weight again, unchanged, with the adapter on."""
    from lit_ft.online.engine_ops import RolloutWeights

    model = nf4_policy(biased_model_dir if bias else tiny_model_dir, lora_b=0.2)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    layers = lora_layers(model, "policy")
    assert all((m.base_layer.bias is not None) == bias for _, m in layers)
    before = [(m, m.base_layer, m.base_layer.weight.data_ptr(), m.base_layer.weight.clone()) for _, m in layers]
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 10, do_sample=False)
    no_lora = model.disable_adapter()
    with no_lora:
        base_only = DecodeEngine(model, eos, pad, adapter=None).generate(ids, mask, 10, do_sample=False)
    assert not torch.equal(plain[0], base_only[0])  # the delta decides tokens: a merge that dropped it would show
    engine = DecodeEngine(model, eos, pad, merged=True)
    merged = engine.generate(ids, mask, 10, do_sample=False)
    assert torch.equal(merged[0], plain[0]) and torch.equal(merged[1], plain[1])
    torch.testing.assert_close(merged[2], plain[2], atol=1e-4, rtol=1e-4)
    sampler = Sampler(model, eos, pad)
    hf = sampler(ids, mask, SamplingSpec(max_new_tokens=10, do_sample=False, engine="hf", merged=True))
    assert torch.equal(hf[0], plain[0]) and torch.equal(hf[1], plain[1])
    shapes = [m.base_layer.weight.quant_state.shape for _, m in layers]
    assert engine.weights.nbytes == RolloutWeights.bytes_needed(model, "policy") == sum(a * b * 4 for a, b in shapes)
    for m, base, ptr, weight in before:
        assert m.base_layer is base and base.weight.data_ptr() == ptr and torch.equal(base.weight, weight)
        assert not m.disable_adapters
    assert torch.equal(DecodeEngine(model, eos, pad).generate(ids, mask, 10, do_sample=False)[0], plain[0])


def test_merged_4bit_base_in_bf16_compute_follows_the_unmerged_policy(tiny_model_dir, tiny_tokenizer):
    """bf16 compute (QLoRA's default): the copy holds bf16 W + delta where the unmerged layer adds a LoRA branch to a
    bf16 matmul, so the two differ by bf16 rounding: the same first tokens, log-probs close where they agree
    (`sampling.dequantize` keeps them equal, above)."""
    model = nf4_policy(tiny_model_dir, lora_b=0.02, compute_dtype="bfloat16")
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 10, do_sample=False)
    engine = DecodeEngine(model, eos, pad, merged=True)
    merged = engine.generate(ids, mask, 10, do_sample=False)
    assert all(c.dtype == torch.bfloat16 for c in engine.weights.copies)
    width = min(plain[0].shape[1], merged[0].shape[1])
    agree = (plain[0][:, :width] == merged[0][:, :width]).long().cumprod(1).bool()
    assert agree[:, 0].all() and agree.float().mean() > 0.5
    torch.testing.assert_close(plain[2][:, :width][agree], merged[2][:, :width][agree], atol=0.02, rtol=0.02)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_dequantized_4bit_base_decodes_exactly_as_the_4bit_layers(tiny_model_dir, tiny_tokenizer, compute):
    """`sampling.dequantize`: the base weights de-quantized once a rollout, the LoRA branches on: the very numbers the
    4-bit layers compute (bf16 compute too, where merging rounds W + delta), with both engines; the copy follows an
    optimizer update; a non-quantized base is refused."""
    model = nf4_policy(tiny_model_dir, lora_b=0.05, compute_dtype=compute)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = -1, tiny_tokenizer.pad_token_id
    plain = DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)
    engine = DecodeEngine(model, eos, pad, dequantize=True)
    out = engine.generate(ids, mask, 12, do_sample=False)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    assert engine.weights.merge is False and all(c.dtype == getattr(torch, compute) for c in engine.weights.copies)
    sampler = Sampler(model, eos, pad)
    hf = sampler(ids, mask, SamplingSpec(max_new_tokens=12, do_sample=False, engine="hf", dequantize=True))
    assert torch.equal(hf[0], plain[0])
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=5.0)
    (training_logprobs(model, ids, mask, out[0], out[1], 1.0) * out[1]).sum().backward()
    opt.step()
    after = engine.generate(ids, mask, 12, do_sample=False)
    assert not torch.equal(after[2], out[2])
    assert torch.equal(after[2], DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)[2])
    with pytest.raises(ValueError, match=r"de-quantized rollouts need a 4-bit base \(model.base.quantization nf4"):
        DecodeEngine(peft_model(tiny_model_dir), eos, pad, dequantize=True)


def test_merged_refuses_an_8bit_base(tiny_model_dir):
    from lit_ft.models import LoraSpec, ModelSpec

    spec = ModelSpec(name_or_path=tiny_model_dir, quantization="int8")
    model, _ = roles.build_roles(spec, LoraSpec(r=4), None, None, "shared_trunk", None)
    with pytest.raises(ValueError, match=r"floating-point or 4-bit \(bitsandbytes\) weights; .* \(an 8-bit base\?\)"):
        DecodeEngine(model.eval(), 2, 2, merged=True)


def test_an_online_stage_refuses_merged_rollouts_over_an_8bit_base_when_it_builds_its_roles(tiny_model_dir):
    """Before the fit's validation and first rollout, naming the setting."""
    from lit_ft.errors import ConfigError
    from lit_ft.models import ModelSpec
    from lit_ft.stages.grpo import GRPOModule

    module = GRPOModule(base=ModelSpec(name_or_path=tiny_model_dir, quantization="int8"),
                        reward_fn="tests.test_ppo.uppercase_share", sampling=SamplingSpec(merged=True))
    with pytest.raises(ConfigError, match=r"model.sampling.merged: merged rollouts need Linear layers over "
                                          r"floating-point or 4-bit .*Linear8bitLt.*; set it false"):
        module.configure_model()


def test_an_online_stage_refuses_the_static_engine_under_mixed_precision_over_fp32_weights(tiny_model_dir):
    """`engine: static` with `bf16-mixed` over fp32 weights (keys and values of two dtypes for one static cache):
    refused when the roles are built, naming both settings; bf16 weights serve it."""
    import lightning as L

    from lit_ft.errors import ConfigError
    from lit_ft.models import ModelSpec
    from lit_ft.stages.grpo import GRPOModule

    def build(dtype):
        module = GRPOModule(base=ModelSpec(name_or_path=tiny_model_dir, dtype=dtype),
                            reward_fn="tests.test_ppo.uppercase_share", sampling=SamplingSpec(engine="static"))
        module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
        module.configure_model()

    with pytest.raises(ConfigError, match=r"model.sampling.engine: static cannot serve this model \(torch.bfloat16 "
                                          r"autocast over torch.float32 weights: trainer.precision .*model.base.dtype"):
        build("float32")
    build("bfloat16")


def nf4_policy(model_dir, device=None, lora_b: float = 0.0, compute_dtype: str = "float32", dtype: str = "auto"):
    """The tiny Llama as PPO holds a 4-bit base (lit_ft's loader, NF4 + double quant, fp32 compute) + LoRA policy
    (`lora_b`: the std of LoRA B's random values; 0 keeps PEFT's zeros). `dtype`: the other weights' (auto: fp32 on
    the CPU, bf16 on CUDA)."""
    from lit_ft.models import LoraSpec, ModelSpec

    spec = ModelSpec(name_or_path=model_dir, quantization="nf4", double_quant=True, compute_dtype=compute_dtype,
                     dtype=dtype)
    model, _ = roles.build_roles(spec, LoraSpec(r=4), None, None, "shared_trunk", device)
    if lora_b:
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, lora_b)
    return model.eval()


def test_4bit_base_greedy_equals_hf_generate(tiny_model_dir, tiny_tokenizer):
    model = nf4_policy(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    ref = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=8)
    out = DecodeEngine(model, eos, pad).generate(ids, mask, 8, do_sample=False)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("merged", [False, True])
def test_second_rollout_after_an_update_uses_the_updated_weights(tiny_model_dir, tiny_tokenizer, merged):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    engine = DecodeEngine(model, eos, pad, merged=merged)
    before = engine.generate(ids, mask, 10, do_sample=False)
    # one optimizer step on the policy LoRA, pushing down the log-probs of the greedy responses
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=5.0)
    loss = (training_logprobs(model, ids, mask, before[0], before[1], 1.0) * before[1]).sum()
    loss.backward()
    opt.step()
    after = engine.generate(ids, mask, 10, do_sample=False)
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=10)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[0], ref) and torch.equal(after[1], ref_mask)
    torch.testing.assert_close(after[2], training_logprobs(model, ids, mask, ref, ref_mask, 1.0) * ref_mask,
                               atol=1e-5, rtol=1e-5)


def test_the_policy_decodes_whatever_adapter_is_active(tiny_model_dir, tiny_tokenizer):
    model = peft_model(tiny_model_dir, adapters=("policy", "value"))
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    ref = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=8)[0]
    model.set_adapter("value")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = DecodeEngine(model, eos, pad).generate(ids, mask, 8, do_sample=False)[0]
    assert torch.equal(out, ref)
    assert model.active_adapter == "value"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_the_decode_step_keeps_every_buffer_in_place(tiny_model_dir, tiny_tokenizer):
    """What a CUDA graph replay needs: the step reads and writes the same storage every time (eager here)."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    engine = DecodeEngine(model, -1, tiny_tokenizer.pad_token_id)
    engine.generate(ids, mask, 8, do_sample=True)  # allocates room for 8 tokens
    engine.generate(ids, mask, 4, do_sample=True)
    state = [engine.tok, engine.pos, engine.t, engine.finished, engine.out, engine.out_logp]
    cache = [t for layer in engine.cache.layers for t in (layer.keys, layer.values)]
    ptrs = [t.data_ptr() for t in state + cache]
    t0, keys0 = int(engine.t), engine.cache.layers[0].keys.clone()
    engine.step()
    assert [t.data_ptr() for t in state + cache] == ptrs
    assert int(engine.t) == t0 + 1
    slot = ids.shape[1] + t0 - 1  # the fed token's cache slot was written, nothing else
    changed = (engine.cache.layers[0].keys != keys0).any(dim=(0, 1, 3)).nonzero().flatten().tolist()
    assert changed == [slot]


def test_top_k_one_sampling_is_greedy(tiny_model_dir, tiny_tokenizer):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    engine = DecodeEngine(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    greedy = engine.generate(ids, mask, 8, do_sample=False)[0]
    assert torch.equal(engine.generate(ids, mask, 8, do_sample=True, top_k=1)[0], greedy)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.5)])
def test_filtering_matches_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(ref))


def test_gumbel_sampling_draws_from_the_policy(tiny_model_dir, tiny_tokenizer):
    """Token frequencies of many first-token draws match the softmax of the prefill logits."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer, TEXTS[:1] * 4000)
    engine = DecodeEngine(model, -1, tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    first = engine.generate(ids, mask, 1, do_sample=True, temperature=0.5)[0][:, 0]
    logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].float()
    p = (logits / 0.5).softmax(-1)
    freq = torch.bincount(first, minlength=p.numel()).float() / len(first)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(first)).sqrt().max() + 1e-3


def test_sampler_auto_uses_hf_on_cpu_and_static_when_asked(tiny_model_dir, tiny_tokenizer):
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    sampler = Sampler(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    hf = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False))
    assert sampler.choice == "hf" and sampler.engine is None
    static = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="static"))
    assert sampler.choice == "static" and sampler.engine is not None
    assert torch.equal(hf[0], static[0]) and torch.equal(hf[1], static[1])


def test_sampler_rebuilds_its_engine_for_a_spec_that_decodes_differently(tiny_model_dir, tiny_tokenizer):
    """A spec asking for another rollout copy (merged) than the engine was built with gets an engine of its own, not
    the first spec's: the same tokens as an engine built for it, and the copy gone again for a plain spec."""
    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    sampler = Sampler(model, eos, pad)
    plain = SamplingSpec(max_new_tokens=6, do_sample=False, engine="static")
    sampler(ids, mask, plain)
    first = sampler.engine
    assert first.weights is None
    out = sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="static", merged=True))
    assert sampler.engine is not first and sampler.engine.weights is not None and sampler.engine.weights.merge
    ref = DecodeEngine(model, eos, pad, merged=True).generate(ids, mask, 6, do_sample=False)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    again = sampler.engine
    sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="static", merged=True, temperature=0.5))
    assert sampler.engine is again  # sampling settings alone keep the engine (its cache and graphs)
    sampler(ids, mask, SamplingSpec(max_new_tokens=6, do_sample=False, engine="static", merged=True, check_every=2))
    assert sampler.engine is again and again.check_every == 2  # read by the host loop only
    sampler(ids, mask, plain)
    assert sampler.engine.weights is None


def test_sampling_settings_that_cannot_hold_are_refused_when_the_spec_is_built():
    """Before any model loads: both rollout copies at once, and a finish check every 0 tokens."""
    from lit_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.sampling.dequantize and model.sampling.merged are both true: .*set "
                                          r"one of them false"):
        SamplingSpec(merged=True, dequantize=True)
    with pytest.raises(ConfigError, match=r"model.sampling.check_every"):
        SamplingSpec(check_every=0)


def test_ppo_iteration_with_the_static_engine(tiny_model_dir, tiny_tokenizer):
    from tests.test_ppo import make_module, prompt_loader, trainer

    module = make_module(tiny_model_dir)
    module.sampling = SamplingSpec(max_new_tokens=8, engine="static", merged=True)
    trainer(2).fit(module, train_dataloaders=prompt_loader(tiny_tokenizer, batch_size=4, n=8))
    assert module.sampler.choice == "static" and module.sampler.engine.weights is not None
    assert module.counters["rollouts"] == 2
    # validation rolls out greedily through the same engine (its allocation reused), equal to HF generate
    batch = next(iter(prompt_loader(tiny_tokenizer, batch_size=3, n=3)))
    ro = module.rollout(batch, SamplingSpec(max_new_tokens=8, do_sample=False, engine="static", merged=True))
    with torch.no_grad():
        ref = generate(module.model.eval(), batch["input_ids"], batch["attention_mask"], SamplingSpec(do_sample=False),
                       tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, max_new_tokens=8)
    assert torch.equal(ro.responses, ref[0]) and torch.equal(ro.mask, ref[1])
    assert module.sampler.engine.shape[0] == 4  # the 3 validation rows ran padded to the training allocation


@pytest.mark.slow
def test_greedy_equals_hf_generate_on_smollm2(smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    lora = LoraConfig(r=8, target_modules="all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir), lora, adapter_name="policy").eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in ["What is 2 plus 3?", "Say hi.", "Name a colour.", "Count from one to twenty in words."]]
    ids, mask = prompts(tok, texts)
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), tok.eos_token_id, tok.pad_token_id,
                             max_new_tokens=24)
    out, out_mask, _ = DecodeEngine(model, tok.eos_token_id, tok.pad_token_id).generate(ids, mask, 24, do_sample=False)
    assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)
    assert ref_mask.sum(1).min() < ref_mask.shape[1]  # a row ended with EOS before the others


def test_bench_rollout_runs_tiny_on_the_cpu(tmp_path):
    """The benchmark script end to end at tiny scale: every engine's decode point, and a W5 iteration per phase."""
    import json
    import subprocess
    import sys

    out = tmp_path / "rollout.json"
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rollout.py")
    cmd = [sys.executable, script, "--tiny", "--batches", "2", "--model-dir", str(tmp_path / "m"),
           "--ppo-engines", "merged", "--ppo-iters", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert [(d["engine"], d["batch"]) for d in report["decode"]] == [("hf", 2), ("static", 2), ("merged", 2)]
    w = report["workload"]
    for d in report["decode"]:
        assert d["new_tokens"] == w["new_tokens"] and d["tokens_per_s"] > 0
        step = d["weight_bytes"] + 2 * report["kv_bytes_per_token"] * (w["prompt_len"] + (w["new_tokens"] - 1) / 2)
        assert d["bandwidth_share"] == pytest.approx(d["tokens_per_s"] * step / (2 * 4.8e12))
    assert report["decode"][2]["merged_copy_bytes"] > 0
    (ppo,) = report["ppo"]["results"]
    assert ppo["engine_used"] == "static" and ppo["merged"]
    assert all(ppo["mean"][k] > 0 for k in ("rollout", "score", "evaluate_rollout", "ppo_update", "iteration"))


def test_grouped_decode_attention_equals_transformers_sdpa():
    """One query token over a grouped-query cache under a padding mask, without expanding the cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lit_ft.online.engine_ops import grouped_decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, t, 16, generator=g) for h, t in ((8, 1), (2, 20), (2, 20)))
    mask = torch.rand(3, 1, 1, 20, generator=g) > 0.3
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4, True, False
    ref = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=0.25)[0]
    torch.testing.assert_close(grouped_decode_attention(module, q, k, v, mask, scaling=0.25)[0], ref)


def test_the_engine_switches_attention_only_during_a_rollout(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from lit_ft.online import engine_ops as rollout

    model = peft_model(tiny_model_dir)
    ids, mask = prompts(tiny_tokenizer)
    calls = []
    real = rollout.grouped_decode_attention
    monkeypatch.setattr(rollout, "grouped_decode_attention",
                        lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    engine = DecodeEngine(model, -1, tiny_tokenizer.pad_token_id)
    engine.generate(ids, mask, 4, do_sample=False)
    layers = model.get_base_model().config.num_hidden_layers
    assert sum(s[2] == 1 for s in calls) == 3 * layers  # every decode step of every layer went through it
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_auto_falls_back_to_hf_for_a_model_the_engine_cannot_serve(tiny_model_dir, tiny_tokenizer):
    from lit_ft.errors import ConfigError

    model = peft_model(tiny_model_dir)
    sampler = Sampler(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    assert sampler.resolve(SamplingSpec(), torch.device("cuda")) == "static"
    assert sampler.resolve(SamplingSpec(), torch.device("cpu")) == "hf"
    model.get_base_model().config._attn_implementation = "flash_attention_2"  # a 2D-mask kernel
    assert sampler.resolve(SamplingSpec(), torch.device("cuda")) == "hf"
    with pytest.raises(ConfigError, match="sampling.engine: static cannot serve this model .attention implementation"):
        sampler.resolve(SamplingSpec(engine="static"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model\.sampling\.engine='vllm': expected one of \['auto', 'static', 'hf'\]"):
        sampler.resolve(SamplingSpec(engine="vllm"), torch.device("cpu"))
