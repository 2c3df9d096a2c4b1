"""`compile: true` (each decoder layer through torch.compile) for every model family lit_ft knows: the compiled
model's loss and LoRA gradients against the same model run eagerly, on a padded batch. On a CUDA device with
inductor, with and without gradient checkpointing; on the CPU (CI) with `aot_eager` (AOTAutograd's graph capture
and partitioning, eager kernels: no C++ toolchain), checkpointing on the Llama shape only. GPT-2, Bloom and
Falcon keep their blocks in `h`, not `layers`: they are found as every family's are (`families.decoder_layers`)."""

from __future__ import annotations

import pytest
import torch

from lit_ft.models import LoraSpec, ModelSpec, build_model, compile_decoder_layers
from tests import test_families
from tests.test_families import PRESENT, _batch

CUDA = torch.cuda.is_available()
DEVICE, BACKEND = ("cuda", "inductor") if CUDA else ("cpu", "aot_eager")
family_dirs = test_families.family_dirs  # the tiny random model of each family, built once per module


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", PRESENT)
def test_compiled_layers_match_eager(family, checkpointing, family_dirs):
    if checkpointing and not CUDA and family != "llama":
        pytest.skip("checkpointed on the CPU: the Llama shape only (time)")
    torch._dynamo.reset()
    torch.manual_seed(0)
    spec = ModelSpec(name_or_path=family_dirs(family), dtype="float32", gradient_checkpointing=checkpointing)
    model = build_model(spec, LoraSpec(r=4, alpha=8, dropout=0.0)).to(DEVICE)
    with torch.no_grad():  # PEFT starts B at zero: make the adapter matter, so its A gradients are compared too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    batch = {k: v.to(DEVICE) for k, v in _batch(model.config.vocab_size).items()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert compile_decoder_layers(model, backend=BACKEND) > 0
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert err < 1e-3, f"{family}: {name}: relative gradient error {err:.2e}"


@torch._dynamo.config.patch(suppress_errors=False)  # what `eager_on_error` sets for the process, restored after
def test_a_layer_that_fails_to_compile_runs_eagerly_when_the_plan_chose_compiling(family_dirs):
    """`eager_on_error` (what `--memory auto` asks when it turned compiling on): a backend that fails leaves the layers
    eager, with the eager loss; asked by the user (the default), the same failure stops the run."""

    def failing_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile")

    torch.manual_seed(0)
    spec = ModelSpec(name_or_path=family_dirs("llama"), dtype="float32")
    model = build_model(spec, LoraSpec(r=4, alpha=8, dropout=0.0))
    batch = _batch(model.config.vocab_size)
    ref_loss, _ = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    compile_decoder_layers(model, backend=failing_backend)
    with pytest.raises(Exception, match="this backend cannot compile"):
        _loss_and_grads(model, batch)
    torch._dynamo.reset()
    compile_decoder_layers(model, backend=failing_backend, eager_on_error=True)
    loss, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
