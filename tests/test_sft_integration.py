"""The real default model (SmolLM2-135M-Instruct from the bundled GGUF): conversion facts and a short SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_model_is_a_plain_checkpoint_with_pinned_tokens(smollm2_dir):
    from lit_ft.models import load_tokenizer

    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config, "the cache must not claim GGUF quantization (save_pretrained fails)"
    tok = load_tokenizer(None)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert config["eos_token_id"] == config["pad_token_id"] == tok.eos_token_id


@pytest.mark.slow
def test_short_sft_lowers_val_loss_and_checkpoint_is_small(smollm2_dir, tmp_path):
    from lit_ft.data.modules import InstructionDataModule
    from lit_ft.cli.export import merge
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.train.optim import OptimSpec
    from lit_ft.stages.sft import SFTModule

    torch.manual_seed(0)
    rows = [json.loads(line) for line in (ROOT / "data/demo/sft_train.jsonl").read_text().splitlines()[:96]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:80]))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[80:]))
    dm = InstructionDataModule(train_file=str(train), val_file=str(val), tokenizer=smollm2_dir, batch_size=8,
                               max_length=128)
    module = SFTModule(base=ModelSpec(name_or_path=smollm2_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0),
                       optim=OptimSpec(lr=2e-3, warmup_ratio=0.0, scheduler="constant"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[ckpt], default_root_dir=str(tmp_path))
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before, (before, after)

    base_bytes = (Path(smollm2_dir) / "model.safetensors").stat().st_size
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_size < 0.15 * base_bytes

    # The adapter merges into the (GGUF-converted) base and saves as a plain HF model.
    module.save_adapter(tmp_path / "adapter", tokenizer=dm.tokenizer)
    merged = merge(tmp_path / "adapter", tmp_path / "merged", base=smollm2_dir)
    assert (merged / "config.json").exists() and (merged / "tokenizer_config.json").exists()
