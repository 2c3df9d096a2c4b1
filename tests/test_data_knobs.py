"""Training knobs users of TRL and Axolotl reach for: NEFTune, lr_find, ShareGPT rows (issue 22)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lit_ft import InstructionDataModule, LoraSpec, ModelSpec, OptimSpec, SFTModule


def _module(tiny_model_dir, **kw):
    return SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0), **kw)


def test_neftune_noise_is_uniform_of_the_papers_scale_in_training_only(tiny_model_dir):
    module = _module(tiny_model_dir, neftune_alpha=5.0)
    module.configure_model()
    embed = module.model.get_input_embeddings()
    ids = torch.randint(0, 100, (4, 24))
    plain = torch.nn.functional.embedding(ids, embed.weight)  # the embedding without any hook
    module.eval()
    assert torch.equal(embed(ids), plain)  # evaluation and generation: no noise
    module.train()
    torch.manual_seed(0)
    noise = embed(ids) - plain
    scale = 5.0 / math.sqrt(24 * plain.shape[-1])  # alpha / sqrt(L d), Jain et al. 2023, Algorithm 1
    assert noise.abs().max() <= scale * (1 + 1e-5) and noise.abs().max() > 0.95 * scale
    # Uniform(-s, s): mean 0, variance s^2 / 3
    assert abs(noise.mean()) < 0.05 * scale and math.isclose(noise.var().item(), scale**2 / 3, rel_tol=0.1)


def test_neftune_changes_training_losses_not_validation(tiny_model_dir):
    batch = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    losses = {}
    for alpha in (None, 15.0):
        torch.manual_seed(0)
        module = _module(tiny_model_dir, neftune_alpha=alpha)
        module.configure_model()
        module.train()
        train = module.token_loss(batch)[0]
        module.eval()
        losses[alpha] = (train, module.token_loss(batch)[0])
    assert not torch.equal(losses[None][0], losses[15.0][0])
    assert torch.equal(losses[None][1], losses[15.0][1])


def test_lr_find_finds_and_sets_the_learning_rate(tiny_model_dir, tmp_path):
    from lightning.pytorch.tuner import Tuner

    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(8)
            for b in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = _module(tiny_model_dir, optim=OptimSpec(lr=1e-4))
    dm = InstructionDataModule(train_file=str(data), tokenizer=tiny_model_dir, max_length=32, batch_size=4,
                               val_split=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0)
    finder = Tuner(trainer).lr_find(module, datamodule=dm, min_lr=1e-5, max_lr=1.0, num_training=30,
                                    early_stop_threshold=None)
    assert finder is not None and len(finder.results["lr"]) == 30
    suggestion = finder.suggestion()
    assert suggestion is not None and module.optim.lr == pytest.approx(suggestion) and module.lr == module.optim.lr
    assert isinstance(module.optim, OptimSpec) and module.optim.lr != 1e-4
