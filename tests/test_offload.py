"""Activation offloading (`model.base.activation_offloading`): the same loss and gradients as the plain run, with and
without gradient checkpointing (then only the layer inputs move), no hooks left behind by a failed forward, the
setting wired through the model builder and the memory plan; on CUDA, a lower peak."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lit_ft.models import LoraSpec, ModelSpec, build_model
from lit_ft.models.offload import install
from tests.conftest import make_tiny_llama

BASE = str(Path(__file__).parent / "fixtures" / "premove" / "base")
IDS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def step(checkpointing: bool, offload: bool, device="cpu"):
    """(loss, gradients of the trainable weights, bytes offloaded) of one forward and backward."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=BASE, gradient_checkpointing=checkpointing), LoraSpec(r=4, dropout=0.0),
                        device=torch.device(device))
    hooks = install(model, min_bytes=0, copy_on_cpu=True) if offload else None
    out = model(input_ids=IDS.to(device), labels=IDS.to(device))
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().cpu(), grads, hooks.offloaded_bytes if hooks else 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloading_gives_the_same_loss_and_gradients(checkpointing):
    loss, grads, _ = step(checkpointing, offload=False)
    loss_o, grads_o, moved = step(checkpointing, offload=True)
    assert moved > 0
    torch.testing.assert_close(loss_o, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_o[name], grads[name], rtol=0, atol=0)


def test_under_checkpointing_only_the_layer_inputs_move():
    """Checkpointing's own hooks own what is saved inside each layer: the outer hooks see each layer's input
    [B, T, H] (kept for the recompute) and what lies outside the layers, far less than every saved tensor."""
    *_, everything = step(False, offload=True)
    *_, boundaries = step(True, offload=True)
    config = build_model(ModelSpec(name_or_path=BASE), LoraSpec(r=4)).get_base_model().config
    layer_inputs = config.num_hidden_layers * IDS.numel() * config.hidden_size * 4
    assert layer_inputs <= boundaries < everything / 4


def test_a_failed_forward_leaves_no_hooks_behind():
    model = build_model(ModelSpec(name_or_path=BASE), LoraSpec(r=4))
    hooks = install(model, min_bytes=0, copy_on_cpu=True)
    with pytest.raises(IndexError):
        model(input_ids=torch.tensor([[10_000_000]]))  # out of the vocabulary: fails inside the decoder
    x = torch.ones(4, 4, requires_grad=True)
    before = hooks.offloaded_bytes
    (x * x).sum()  # a grad-enabled op outside the model: no hook may see it
    assert hooks.offloaded_bytes == before


def test_the_setting_installs_the_hooks_and_the_plan_counts_two_layers(tmp_path):
    import shutil

    from lit_ft import SFTModule
    from lit_ft.plan import Settings, estimate_settings
    from lit_ft.plan.memory import levers
    from lit_ft.train.optim import OptimSpec

    module = SFTModule(base=ModelSpec(name_or_path=BASE, activation_offloading=True), lora=LoraSpec(r=4))
    module.configure_model()
    assert hasattr(module.model.get_base_model(), "lit_ft_offload")

    deep = tmp_path / "eight_layers"  # the tiny base with 8 layers: 2 of them stay on the GPU
    make_tiny_llama(str(deep), vocab_size=module.model.get_base_model().config.vocab_size, num_hidden_layers=8)
    for f in Path(BASE).glob("tokenizer*"):
        shutil.copy(f, deep)

    def saved(offloading: bool) -> int:
        s = Settings(stage="sft", base=ModelSpec(name_or_path=str(deep), activation_offloading=offloading), lora=LoraSpec(),
                     optim=OptimSpec(), batch_size=4, max_length=64, target="cuda")
        return next(b for c, b, _ in estimate_settings(s, budget=None).rows if c.startswith("activations (saved"))

    plain, offloaded = saved(False), saved(True)
    assert plain * 2 / 8 <= offloaded < plain / 2  # two layers' worth of the trunk stays, and the loss gather
    s = Settings(stage="sft", base=ModelSpec(name_or_path=BASE), lora=LoraSpec(), optim=OptimSpec(), batch_size=4,
                 max_length=64, target="cuda")
    assert any("--model.base.activation_offloading" in args for _, args, _, _ in levers(s))
    assert not any("--model.base.activation_offloading" in args
                   for _, args, _, _ in levers(dataclasses.replace(s, target="cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host buffers and a side stream")
def test_on_cuda_the_peak_drops_and_the_numbers_stay():
    def run(offload: bool):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = build_model(ModelSpec(name_or_path=BASE, dtype="float32", activation_offloading=offload),
                            LoraSpec(r=4, dropout=0.0), device=torch.device("cuda"))
        ids = torch.randint(0, 100, (8, 512), generator=torch.Generator().manual_seed(0)).cuda()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, torch.cuda.max_memory_allocated() - start

    loss, grads, peak = run(False)
    loss_o, grads_o, peak_o = run(True)
    assert loss_o == loss and all(torch.equal(grads[k], grads_o[k]) for k in grads)
    assert peak_o < peak


@pytest.mark.parametrize("family", ["opt", "gpt2", "phi3"])
def test_other_families_offload_with_the_same_numbers(family, tmp_path):
    """Not only Llama-shaped stacks: OPT's causal LM calls its decoder past the `base_model_prefix` module (the
    hooks sit on `get_decoder()`), GPT-2 keeps Conv1D projections, Phi-3 fused ones."""
    import shutil

    from tests.family_models import make_family_model

    make_family_model(family, str(tmp_path), 512)
    for f in Path(BASE).glob("tokenizer*"):
        shutil.copy(f, tmp_path)

    def run(offload: bool):
        torch.manual_seed(0)
        model = build_model(ModelSpec(name_or_path=str(tmp_path)), LoraSpec(r=4, dropout=0.0))
        hooks = install(model, min_bytes=0, copy_on_cpu=True) if offload else None
        ids = IDS % 512
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, hooks

    loss, grads, _ = run(False)
    loss_o, grads_o, hooks = run(True)
    assert hooks.offloaded_bytes > 0 and torch.equal(loss, loss_o)
    assert all(torch.equal(grads[k], grads_o[k]) for k in grads)
