"""The model factory: LoRA targets, k-bit builds, checkpointing keeps LoRA trainable, warnings, loading errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_ft.errors import ConfigError
from lit_ft.models import (
    ALL_PROJECTIONS,
    LoraSpec,
    ModelSpec,
    build_model,
    load_tokenizer,
    resolve_name,
    trainable_state_dict,
)


def _lora_module_names(model) -> set[str]:
    return {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


def test_default_lora_targets_every_projection(tiny_model_dir):
    model = build_model(ModelSpec(name_or_path=tiny_model_dir), LoraSpec(r=4))
    assert _lora_module_names(model) == set(ALL_PROJECTIONS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Checkpoints keep exactly the trainable tensors.
    assert set(trainable_state_dict(model)) == trainable


@pytest.mark.parametrize("quantization, layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_kbit_build_trains_lora_with_checkpointing(tiny_model_dir, quantization, layer):
    spec = ModelSpec(name_or_path=tiny_model_dir, quantization=quantization, gradient_checkpointing=True)
    model = build_model(spec, LoraSpec(r=4))
    base_layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == layer
    model.train()
    x = torch.randint(0, 300, (2, 10))
    model(input_ids=x, labels=x).loss.backward()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for p in lora), "gradient checkpointing cut the LoRA graph"
    assert any(p.grad.abs().sum() > 0 for p in lora)


def _lora_model(model_dir, checkpointing: bool, dropout: float, task: str = "causal_lm"):
    """A float32 LoRA model of the tiny base in training mode, its B matrices random (LoRA's start is B = 0, which
    would give the A matrices no gradient to compare)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=model_dir, dtype="float32", gradient_checkpointing=checkpointing),
                        LoraSpec(r=4, dropout=dropout), task)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train()


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_layers_run_reentrant_where_it_is_exact(tiny_model_dir, monkeypatch, tmp_path):
    """Decoder layers run reentrant, and the loss and every LoRA gradient equal the run without checkpointing, LoRA
    dropout on (the recompute draws the same masks); compiled layers, a block whose keyword input requires grad, one
    none of whose positional inputs does (its weights would get no gradient), and any block under a process group
    run non-reentrant, with exact gradients."""
    import functools

    from lit_ft.models import load

    calls = []

    def spy(function, *args, use_reentrant):
        calls.append(use_reentrant)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant)

    monkeypatch.setattr(load, "checkpoint", spy)
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))

    def run(checkpointing):
        model = _lora_model(tiny_model_dir, checkpointing, dropout=0.3)
        torch.manual_seed(2)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _grads(model)

    plain_loss, plain = run(False)
    assert calls == []
    loss, grads = run(True)
    assert calls == [True, True]  # the tiny Llama's two layers (PEFT makes the embedding's output require grad)
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain.keys() and all(g is not None for g in grads.values())
    for n in plain:
        torch.testing.assert_close(grads[n], plain[n])

    from lit_ft.models import compile_decoder_layers

    calls.clear()
    torch._dynamo.reset()
    model = build_model(ModelSpec(name_or_path=tiny_model_dir, dtype="float32", gradient_checkpointing=True),
                        LoraSpec(r=4))
    compile_decoder_layers(model, backend="aot_eager")  # compiled layers: non-reentrant (no no-grad graphs)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    assert calls and not any(calls)

    w = torch.randn(4, requires_grad=True)
    for x_grad, keyword, reentrant in ((True, True, False), (False, False, False), (True, False, True)):
        x, other = torch.randn(4, requires_grad=x_grad), torch.randn(4)

        def v():  # a keyword input computed from w and also used outside the block (reentrant: a failed backward)
            return w * 2 if keyword else other

        def loss(out, v):
            return out.sum() + v.sum()

        x.grad = w.grad = None
        v_in = v()
        loss(load.checkpoint_layer(functools.partial(lambda x, v: (x * v * w).sin() * x, v=v_in), x), v_in).backward()
        assert calls[-1] is reentrant
        inputs = tuple(t for t in (x, w) if t.requires_grad)
        v_in = v()
        expected = torch.autograd.grad(loss((x * v_in * w).sin() * x, v_in), inputs)
        torch.testing.assert_close(tuple(t.grad for t in inputs), expected)

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:  # DDP's and FSDP's hooks: non-reentrant under any process group, one process included
        load.checkpoint_layer(functools.partial(lambda x: x.sin()), torch.randn(4, requires_grad=True)).sum().backward()
        assert calls[-1] is False
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("task", ["score", "causal_lm"])
def test_checkpointed_reward_and_preference_passes_keep_their_gradients(tiny_model_dir, task):
    """The reward model's score pass and DPO's response log-prob pass over padded rows give the same outputs and
    LoRA gradients checkpointed (reentrant layers) as not, LoRA dropout on."""
    from lit_ft.online import scoring
    from lit_ft.stages import dpo_ref

    ids = torch.randint(3, 200, (4, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[3, 5:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt

    def run(checkpointing):
        model = _lora_model(tiny_model_dir, checkpointing, dropout=0.2, task=task)
        torch.manual_seed(1)
        if task == "score":
            out = scoring.sequence_scores(model, ids, mask)
        else:
            out = dpo_ref.sequence_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})[0]
        (out * torch.arange(1.0, 5.0)).sum().backward()
        return out.detach(), _grads(model)

    out, grads = run(False)
    out_c, grads_c = run(True)
    torch.testing.assert_close(out_c, out)
    assert grads.keys() == grads_c.keys() and all(g is not None for g in grads_c.values())
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n])


def test_nf4_double_quant_and_compute_dtype(tiny_model_dir):
    spec = ModelSpec(name_or_path=tiny_model_dir, quantization="nf4", double_quant=True, compute_dtype="bfloat16")
    model = build_model(spec, LoraSpec(r=4))
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested, "double quantization is off"
    assert layer.compute_dtype == torch.bfloat16


def test_bad_practice_warnings(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lit_ft.models import check_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="ranks far above 64"):
        check_lora(LoraSpec(r=256))
    with pytest.warns(UserWarning, match="adapts none of the attention projections"):
        check_lora(LoraSpec(target_modules=["gate_proj", "down_proj"]), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(check_lora(LoraSpec(), model)) == sorted(ALL_PROJECTIONS)
        assert check_lora(LoraSpec(target_modules=["q_proj", "v_proj"]), model) == ["q_proj", "v_proj"]


def test_loading_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: GGUF file .* does not exist"):
        resolve_name(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_name(str(tmp_path))
    with pytest.raises(ConfigError, match="local path ./nowhere does not exist"):
        resolve_name("./nowhere")


def test_missing_adapter_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.adapter: .* has no adapter_config.json"):
        build_model(ModelSpec(name_or_path=tiny_model_dir, adapter=str(tmp_path)), None)


def test_no_adapter_and_no_lora_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="nothing would be trained"):
        build_model(ModelSpec(name_or_path=tiny_model_dir), None)


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    from tests.conftest import make_tiny_llama, make_tokenizer

    tok = make_tokenizer(str(tmp_path))
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    make_tiny_llama(str(tmp_path), len(tok))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_tokenizer_loads_from_a_directory_holding_only_a_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(str(tmp_path))  # no config.json: a tokenizer alone
    assert load_tokenizer(str(tmp_path)).get_vocab() == tiny_tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="without config.json$"):
        build_model(ModelSpec(name_or_path=str(tmp_path)), LoraSpec(r=4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json or tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))


def test_trust_remote_code_is_off_by_default():
    assert ModelSpec().trust_remote_code is False


def test_reward_model_starts_from_the_sft_adapter(tiny_model_dir, tmp_path):
    """A CAUSAL_LM (SFT) adapter under a score model: same LoRA weights, same trunk output, a new trainable head."""
    sft = build_model(ModelSpec(name_or_path=tiny_model_dir), LoraSpec(r=4))
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # a trained-looking adapter (fresh lora_B is zero)
    sft.save_pretrained(str(tmp_path / "sft"))
    rm = build_model(ModelSpec(name_or_path=tiny_model_dir, adapter=str(tmp_path / "sft")), None, "score")
    assert rm.peft_config["default"].task_type == "SEQ_CLS"
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    x = torch.randint(0, 300, (2, 9))
    sft.eval(), rm.eval()
    with torch.no_grad():
        h_sft = sft.get_base_model().model(input_ids=x).last_hidden_state
        h_rm = rm.get_base_model().model(input_ids=x).last_hidden_state
    torch.testing.assert_close(h_rm, h_sft, rtol=0, atol=0)
    # The exported reward adapter is an ordinary SEQ_CLS adapter with its head.
    rm.save_pretrained(str(tmp_path / "rm"))
    again = build_model(ModelSpec(name_or_path=tiny_model_dir, adapter=str(tmp_path / "rm")), None, "score").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, rm(input_ids=x).logits, rtol=0, atol=0)
    # A reward adapter has no language-model head: a causal-LM stage refuses it by name.
    with pytest.raises(ConfigError, match="is a reward adapter .*SEQ_CLS"):
        build_model(ModelSpec(name_or_path=tiny_model_dir, adapter=str(tmp_path / "rm")), None)


def test_4bit_layers_keep_their_gradient_after_an_eval_pass(tiny_model_dir):
    """Validation or a rollout (eval mode, no grad) must not change the next training step's gradients.

    bitsandbytes repacks 4-bit weights for an AVX512-BF16 kernel without a backward on such CPUs; the factory turns
    that off. Reference: the same model (same seed) that never ran an eval pass.
    """
    spec = ModelSpec(name_or_path=tiny_model_dir, quantization="nf4")
    x = torch.randint(0, 300, (2, 10))

    def lora_grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(spec, LoraSpec(r=4, dropout=0.0))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, after_eval = lora_grads(False), lora_grads(True)
    assert any(g.abs().sum() > 0 for g in reference.values())
    for name, grad in reference.items():
        torch.testing.assert_close(after_eval[name], grad, msg=name)


def test_a_4bit_layer_passes_the_input_gradient_after_an_eval_pass():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from lit_ft.models import disable_cpu_4bit_repacking

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert disable_cpu_4bit_repacking(layer) == 1
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(4, 128)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T)
    layer.train()
    x.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(4, -1))


def test_adapter_from_a_gathered_state_matches_peft_save_pretrained(tiny_model_dir, tmp_path):
    """The FSDP export path (adapter files written from a gathered state dict) writes what PEFT's own
    save_pretrained writes: same tensors, same config, loadable. (FSDP itself needs a GPU:
    tests/test_strategies_gpu.py runs the gathered path there.)"""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from lit_ft.train.checkpointing import save_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                      task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "gathered", state_dict={k: v.clone() for k, v in model.state_dict().items()})
    ref, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "gathered"))
    assert sorted(ours) == sorted(ref) and any("score" in k for k in ours) and any("lora_B" in k for k in ours)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "gathered")]
    assert configs[0] == configs[1] and configs[1]["inference_mode"] is True
