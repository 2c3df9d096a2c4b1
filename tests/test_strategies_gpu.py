"""Sharded strategies on one CUDA device (skipped without one; CI has none): FSDP with LoRA trains, generates
through `strategies.for_generation`, clips, checkpoints and exports; a quantized base under FSDP, DeepSpeed ZeRO-3
and PPO under FSDP or DeepSpeed are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "completion": f"{i} + 1 = {i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(40)))
    return str(path)


def _fit(strategy, model_dir, rows, tmp_path, precision, clip=None, callbacks=(), **base):
    import lightning as L

    from lit_ft.callbacks import SampleGenerations
    from lit_ft.data.modules import InstructionDataModule
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.stages.sft import SFTModule

    dm = InstructionDataModule(train_file=rows, val_file=rows, tokenizer=model_dir, batch_size=4, max_length=64)
    module = SFTModule(base=ModelSpec(name_or_path=model_dir, **base), lora=LoraSpec(r=4))
    gens = SampleGenerations(num_prompts=4, max_new_tokens=4)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, max_steps=3,
                        gradient_clip_val=clip, limit_val_batches=1, logger=False, enable_progress_bar=False,
                        callbacks=[gens, *callbacks], default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    return trainer, gens


def test_fsdp_lora_trains_generates_checkpoints_and_exports(tiny_model_dir, rows, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lit_ft.callbacks import ExportAdapter
    from lit_ft.train.strategies import wrap_decoder_layers

    # frozen and LoRA tensors share FSDP units, so they share a dtype: fp32 weights, bf16 autocast
    export = tmp_path / "adapter"
    trainer, gens = _fit(FSDPStrategy(auto_wrap_policy=wrap_decoder_layers), tiny_model_dir, rows, tmp_path,
                         "bf16-mixed", clip=1.0, callbacks=[ExportAdapter(str(export))], dtype="float32")
    assert trainer.global_step == 3 and gens.before is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    # The export holds every LoRA tensor in its full shape (FSDP's own state_dict() gave an empty file), and it
    # loads onto a plain base in a process without FSDP with the trained values.
    saved = load_file(str(export / "adapter_model.safetensors"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(export))
    lora = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    assert len(saved) == len(lora) > 0
    assert any(float(p.abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)  # trained (lora_B starts at 0)


def test_fsdp_refuses_a_quantized_base_by_name(tiny_model_dir, rows, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_ft.errors import ConfigError
    from lit_ft.train.strategies import wrap_decoder_layers

    with pytest.raises(ConfigError, match=r"model.base.quantization=nf4 under FSDP is not supported"):
        _fit(FSDPStrategy(auto_wrap_policy=wrap_decoder_layers), tiny_model_dir, rows, tmp_path, "bf16-true",
             quantization="nf4", quant_storage="bfloat16", dtype="bfloat16")


def test_deepspeed_zero3_is_refused_by_name(tiny_model_dir, rows, tmp_path):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lit_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 is not supported"):
        _fit(DeepSpeedStrategy(stage=3), tiny_model_dir, rows, tmp_path, "bf16-mixed")


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_ppo_refuses_deepspeed_and_fsdp_by_name(strategy, tiny_model_dir):
    """PPO under ZeRO-2 ran without an error but left trainable weights unchanged (H200, 2026-12-01): refused, as
    FSDP is, before any model is built."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    from transformers import AutoTokenizer

    from lit_ft.errors import ConfigError
    from tests.test_ppo import make_module, prompt_loader

    chosen, name = (DeepSpeedStrategy(stage=2), "DeepSpeed") if strategy == "deepspeed" else (FSDPStrategy(), "FSDP")
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=chosen, max_epochs=1, limit_train_batches=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module = make_module(tiny_model_dir)
    with pytest.raises(ConfigError, match=rf"trainer.strategy: PPO under {name} is not supported"):
        trainer.fit(module, train_dataloaders=prompt_loader(AutoTokenizer.from_pretrained(tiny_model_dir)))
    assert module.model is None
