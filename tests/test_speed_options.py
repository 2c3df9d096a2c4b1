"""Speed/memory switches compute the same function: loss and LoRA gradients with and without each option.

`SFTModule(compile=True)` and `RewardModule(compile=True)` are checked with inductor on a GPU and with `aot_eager` on the CPU (AOTAutograd's
graph capture and min-cut partitioning, eager kernels: no C++ toolchain or minutes of compiling in CI).
`ModelSpec(liger_kernel=True)` runs Triton kernels and is checked only where CUDA and liger-kernel exist.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from lit_ft import models

from lit_ft.stages import sft
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.stages.sft import SFTModule

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _module(model_dir: str, **kw) -> SFTModule:
    base = ModelSpec(name_or_path=model_dir, dtype="float32", liger_kernel=kw.pop("liger_kernel", False))
    # No dropout: the option must give the same function, and compiled dropout draws other random masks.
    module = SFTModule(base=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), **kw)
    return _init(module)


def _init(module: SFTModule) -> SFTModule:
    torch.manual_seed(0)  # the same LoRA A in every module compared
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter so its gradients are compared too
            torch.nn.init.normal_(p, std=0.02)
    return module.to(DEVICE)


def _batch(vocab: int, packed: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt part without loss
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if packed:  # two sequences per row, restarting positions
        batch["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _loss_and_grads(module: SFTModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_sum, n = module.token_loss(batch)
    loss = loss_sum / n
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(ref, out, rtol: float = 1e-4):
    (l_ref, g_ref), (l_out, g_out) = ref, out
    torch.testing.assert_close(l_out, l_ref, rtol=rtol, atol=1e-5)
    assert g_ref.keys() == g_out.keys() and g_ref
    for name in g_ref:
        err = (g_out[name] - g_ref[name]).norm() / g_ref[name].norm().clamp(min=1e-12)
        assert err < 10 * rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("packed", [False, True])
def test_compile_matches_eager(tiny_model_dir, tiny_tokenizer, monkeypatch, packed):
    backend = "inductor" if CUDA else "aot_eager"
    monkeypatch.setattr(sft, "compile_decoder_layers", functools.partial(models.compile_decoder_layers, backend=backend))
    torch._dynamo.reset()
    batch = _batch(len(tiny_tokenizer), packed)
    ref = _loss_and_grads(_module(tiny_model_dir), batch)
    compiled = _module(tiny_model_dir, compile=True)
    assert compiled.compile_layers and callable(compiled.compile)  # the flag does not hide nn.Module.compile
    layers = compiled.model.get_base_model().get_decoder().layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    _assert_same(ref, _loss_and_grads(compiled, batch))


def test_compile_with_gradient_checkpointing(tiny_model_dir, tiny_tokenizer, monkeypatch):
    backend = "inductor" if CUDA else "aot_eager"
    monkeypatch.setattr(sft, "compile_decoder_layers", functools.partial(models.compile_decoder_layers, backend=backend))
    torch._dynamo.reset()
    batch = _batch(len(tiny_tokenizer))
    ref = _loss_and_grads(_module(tiny_model_dir), batch)
    module = SFTModule(
        base=ModelSpec(name_or_path=tiny_model_dir, dtype="float32", gradient_checkpointing=True),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        compile=True,
    )
    _assert_same(ref, _loss_and_grads(_init(module), batch))


@pytest.mark.skipif(not CUDA or importlib.util.find_spec("liger_kernel") is None, reason="needs CUDA and liger-kernel")
def test_liger_kernel_matches_eager(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers.models.llama import modeling_llama

    # Liger swaps module-level functions of transformers: restore them after this test.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    batch = _batch(len(tiny_tokenizer))
    ref = _loss_and_grads(_module(tiny_model_dir), batch)
    _assert_same(ref, _loss_and_grads(_module(tiny_model_dir, liger_kernel=True), batch))


def test_liger_kernel_refused_without_cuda(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="liger"):
        models.apply_liger_kernel(torch.nn.Linear(2, 2))


def test_reward_compile_matches_eager(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from lit_ft.stages import reward
    from lit_ft.stages.reward import RewardModule

    backend = "inductor" if CUDA else "aot_eager"
    monkeypatch.setattr(reward, "compile_decoder_layers",
                        functools.partial(models.compile_decoder_layers, backend=backend))

    def rm(**kw):
        base = ModelSpec(name_or_path=tiny_model_dir, dtype="float32")
        return _init(RewardModule(base=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), center_coef=0.01, **kw))

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, len(tiny_tokenizer), (4, 16), generator=g)  # 2 pairs: chosen rows, then rejected rows
    mask = torch.ones_like(ids)
    mask[1, 12:] = mask[3, 10:] = 0  # right padding: the score is read at the last real token
    batch = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "margin": torch.zeros(2, device=DEVICE)}

    def loss_and_grads(module):
        loss = module.pair_loss(batch)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}

    ref = loss_and_grads(rm())
    compiled = rm(compile=True)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.get_base_model().get_decoder().layers)
    out = loss_and_grads(compiled)
    assert any("score" in n for n in out[1])  # the head's gradient is compared too
    _assert_same(ref, out)


# -- fewer launches a step: the finiteness checks and the optimizer ----------------------------------------------


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_all_finite_matches_the_per_tensor_check(bad):
    """The multi-tensor check (one norm launch per device and dtype) decides as `isfinite(t).all()` per tensor,
    over mixed dtypes and shapes, a bad value in any one tensor, and an empty tensor."""
    from lit_ft.train.integrity import all_finite

    torch.manual_seed(0)
    base = [torch.randn(7, 5), torch.randn(3).to(torch.bfloat16), torch.randn(2, 2, 2, dtype=torch.float64),
            torch.empty(0), torch.randn(1000) * 1e3]
    for i in range(len(base)):
        ts = [t.clone() for t in base]
        if bad is not None and ts[i].numel():
            ts[i].view(-1)[ts[i].numel() // 2] = bad
        want = all(bool(torch.isfinite(t).all()) for t in ts)
        got = all_finite(ts)
        assert got.dtype == torch.bool and got.dim() == 0 and bool(got) == want
    assert all_finite([]) is None


def test_fused_adamw_matches_the_multi_tensor_step():
    """make_optimizer takes torch's fused AdamW (CPU and CUDA); three steps equal the multi-tensor AdamW's."""
    from lit_ft.train.optim import OptimSpec, make_optimizer

    torch.manual_seed(0)
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(16, 8, device=DEVICE))) for i in range(4)]
    fused = make_optimizer(named, OptimSpec(lr=1e-2, weight_decay=0.1))
    assert fused.defaults["fused"] is True
    copies = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    plain = torch.optim.AdamW([{"params": copies, "weight_decay": 0.1}], lr=1e-2, foreach=True)
    for _ in range(3):
        for (_, p), q in zip(named, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for (_, p), q in zip(named, copies):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_adamw_clips_under_mixed_precision(tiny_model_dir, tmp_path):
    """Lightning's mixed-precision plugin refuses gradient clipping for an optimizer that says it unscales
    gradients itself (fused AdamW does): the optimizer declines, and a bf16-mixed fit with `gradient_clip_val`
    (PPO always clips) runs its step through the plugin's clipping and moves the weights."""
    import lightning as L

    from lit_ft.train.optim import OptimSpec, make_optimizer

    opt = make_optimizer([("w", torch.nn.Parameter(torch.randn(4, 4)))], OptimSpec())
    assert opt.defaults["fused"] is True and not getattr(opt, "_step_supports_amp_scaling", False)
    module = _module(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    batch = _batch(module.model.config.vocab_size)
    loader = torch.utils.data.DataLoader([{k: v[i].cpu() for k, v in batch.items()} for i in range(2)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, gradient_clip_val=1e-3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module.cpu(), train_dataloaders=loader)
    moved = {n: (p.detach() - before[n]).norm() for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(v) for v in moved.values()) and any(v > 0 for v in moved.values())
