"""The decode engine on one CUDA device, with its CUDA-graph replay (skipped without one; CI has none): the same
checks as `test_rollout.py` against HF `generate` and the training forward, now through the captured step."""

from __future__ import annotations

import pytest
import torch

from lit_ft.online.generation import SamplingSpec, generate
from lit_ft.online.engine import DecodeEngine
from tests.test_rollout import mid_batch_eos, nf4_policy, peft_model, prompts, training_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 without TF32, so the engine and HF generate compute the same numbers."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on_device(model_dir, tokenizer, **kw):
    model = peft_model(model_dir, **kw).to(DEVICE)
    ids, mask = prompts(tokenizer)
    return model, ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("merged", [False, True])
def test_captured_greedy_equals_hf_generate_with_eos_mid_batch(tiny_model_dir, tiny_tokenizer, merged, compile):
    model, ids, mask = on_device(tiny_model_dir, tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    eos = mid_batch_eos(model, ids, mask, pad, 16)
    engine = DecodeEngine(model, eos, pad, merged=merged, check_every=4, compile=compile)
    out, out_mask, _ = engine.generate(ids, mask, 16, do_sample=False)
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=16)
    assert engine.graphs, "the decode step was not captured"
    assert (engine.compiled is not None) == compile, "the step did not compile"
    assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)
    assert ref_mask.sum(1).min() < ref_mask.sum(1).max()


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("merged", [False, True])
def test_replayed_graph_follows_an_optimizer_update(tiny_model_dir, tiny_tokenizer, merged, compile):
    model, ids, mask = on_device(tiny_model_dir, tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    engine = DecodeEngine(model, eos, pad, merged=merged, compile=compile)
    before = engine.generate(ids, mask, 12, do_sample=False)
    graph = engine.graphs[(False, 1.0, 0, 1.0)]
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad], lr=0.05)
    (training_logprobs(model, ids, mask, before[0], before[1], 1.0) * before[1]).sum().backward()
    opt.step()
    after = engine.generate(ids, mask, 12, do_sample=False)
    assert engine.graphs[(False, 1.0, 0, 1.0)] is graph  # replayed, not recaptured: it reads the updated weights
    ref, ref_mask = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=12)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[0], ref) and torch.equal(after[1], ref_mask)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_sampling_logprobs_equal_training_forward(tiny_model_dir, tiny_tokenizer, dtype, compile):
    """Sampled at temperature 0.7 with top-p; bf16: bf16 weights under bf16 autocast (bf16-true with autocast)."""
    model, ids, mask = on_device(tiny_model_dir, tiny_tokenizer, adapters=("policy", "value"))
    model.to(dtype)
    model.set_adapter("value")  # the engine decodes with the policy whatever adapter is active
    engine = DecodeEngine(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, compile=compile)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        responses, rmask, logp = engine.generate(ids, mask, 16, do_sample=True, temperature=0.7, top_p=0.95)
        model.set_adapter("policy")
        ref = training_logprobs(model, ids, mask, responses, rmask, 0.7).float()
    assert engine.graphs and rmask.sum() > 16
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(logp, ref * rmask, **tol)


def test_auto_decodes_with_hf_under_autocast_over_fp32_weights(tiny_model_dir, tiny_tokenizer):
    """fp32 weights under bf16 autocast (bf16-mixed): the static cache would get keys and values of mixed dtypes
    (the engine's index_copy_ failed on the H200), so auto uses HF generate and static is refused by name."""
    from lit_ft.errors import ConfigError
    from lit_ft.online.sampler import Sampler

    model, ids, mask = on_device(tiny_model_dir, tiny_tokenizer, adapters=("policy",))
    sampler = Sampler(model, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert sampler.resolve(SamplingSpec(engine="auto"), ids.device) == "hf"
        with pytest.raises(ConfigError, match="bfloat16 autocast over torch.float32 weights"):
            sampler.resolve(SamplingSpec(engine="static"), ids.device)
    assert sampler.resolve(SamplingSpec(engine="auto"), ids.device) == "static"


@pytest.mark.parametrize("compile", [False, True])
def test_4bit_base_is_captured_and_matches_hf_generate(tiny_model_dir, tiny_tokenizer, compile, caplog):
    """Compiled: bitsandbytes' ops traced, or the engine falls back to eager saying so; the tokens the same."""
    model = nf4_policy(tiny_model_dir, torch.device(DEVICE))
    ids, mask = (t.to(DEVICE) for t in prompts(tiny_tokenizer))
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    engine = DecodeEngine(model, eos, pad, compile=compile)
    out = engine.generate(ids, mask, 12, do_sample=False)
    ref = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=12)
    assert engine.graphs
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    if compile and engine.compiled is None:
        assert "torch.compile failed on this model" in caplog.text


@pytest.mark.parametrize("compile", [False, True])
def test_4bit_base_merged_is_captured_and_decodes_the_unmerged_policy(tiny_model_dir, tiny_tokenizer, compile):
    """A QLoRA policy decoded from its de-quantized, merged copy through the captured (and compiled) step: the
    unmerged engine's tokens, and after an optimizer update the updated policy's (the copy is refreshed in place).
    In fp32 throughout: with bf16 activations (the `auto` dtype on CUDA) bitsandbytes' own 4-bit GEMM and cuBLAS over
    the copy round differently by a bf16 step, which flips near-tied greedy tokens (seen on an H100)."""
    model = nf4_policy(tiny_model_dir, torch.device(DEVICE), lora_b=0.2, dtype="float32")
    ids, mask = (t.to(DEVICE) for t in prompts(tiny_tokenizer))
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    engine = DecodeEngine(model, eos, pad, merged=True, compile=compile)
    out = engine.generate(ids, mask, 12, do_sample=False)
    assert engine.graphs and (engine.compiled is not None) == compile
    assert torch.equal(out[0], DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)[0])
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad], lr=5.0)
    (training_logprobs(model, ids, mask, out[0], out[1], 1.0) * out[1]).sum().backward()
    opt.step()
    after = engine.generate(ids, mask, 12, do_sample=False)
    assert not torch.equal(after[0], out[0])
    assert torch.equal(after[0], DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)[0])


@pytest.mark.parametrize("compile", [False, True])
def test_4bit_base_dequantized_decodes_as_the_4bit_layers(tiny_model_dir, tiny_tokenizer, compile):
    """`sampling.dequantize` through the captured (and compiled) step, in fp32: the 4-bit engine's tokens, and after an
    optimizer update the updated policy's."""
    model = nf4_policy(tiny_model_dir, torch.device(DEVICE), lora_b=0.05, dtype="float32")
    ids, mask = (t.to(DEVICE) for t in prompts(tiny_tokenizer))
    eos, pad = -1, tiny_tokenizer.pad_token_id
    engine = DecodeEngine(model, eos, pad, dequantize=True, compile=compile)
    out = engine.generate(ids, mask, 12, do_sample=False)
    assert engine.graphs and engine.weights is not None
    assert torch.equal(out[0], DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)[0])
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad], lr=5.0)
    (training_logprobs(model, ids, mask, out[0], out[1], 1.0) * out[1]).sum().backward()
    opt.step()
    after = engine.generate(ids, mask, 12, do_sample=False)
    assert torch.equal(after[0], DecodeEngine(model, eos, pad).generate(ids, mask, 12, do_sample=False)[0])


def test_4bit_base_in_bf16_dequantized_is_closer_to_the_4bit_layers_than_merged(tiny_model_dir, tiny_tokenizer):
    """bf16 weights and compute on CUDA: bitsandbytes' 4-bit GEMM and cuBLAS over a copy round differently, so
    neither copy is exact; the de-quantized copy (LoRA kept) stays closer to the training forward's log-probs than
    the merged one (W + delta rounded to bf16)."""
    model = nf4_policy(tiny_model_dir, torch.device(DEVICE), lora_b=0.2, compute_dtype="bfloat16")
    ids, mask = (t.to(DEVICE) for t in prompts(tiny_tokenizer))
    eos, pad = -1, tiny_tokenizer.pad_token_id
    gap = {}
    for mode in ("dequantize", "merged"):
        torch.manual_seed(0)
        responses, rmask, logp = DecodeEngine(model, eos, pad, **{mode: True}).generate(ids, mask, 12)
        train = training_logprobs(model, ids, mask, responses, rmask, 1.0).float()
        gap[mode] = float(((logp - train) * rmask).abs().sum() / rmask.sum())
    assert gap["dequantize"] < gap["merged"], gap
