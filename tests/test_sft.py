"""SFTModule on a tiny random Llama: loss against transformers' own, packing, learning, checkpoints, export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.callbacks import ExportAdapter
from lit_ft.data.modules import InstructionDataModule
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.stages.sft import SFTModule

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(4) for b in range(4)]


def _write_data(tmp_path: Path) -> tuple[str, str]:
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    val.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:8]))
    return str(train), str(val)


def _module(model_dir: str, lr: float = 1e-2, **base) -> SFTModule:
    return SFTModule(
        base=ModelSpec(name_or_path=model_dir, **base),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        optim=OptimSpec(lr=lr, warmup_ratio=0.0, scheduler="constant"),
    )


def _datamodule(tmp_path, model_dir, **kw) -> InstructionDataModule:
    train, val = _write_data(tmp_path)
    return InstructionDataModule(train_file=train, val_file=val, tokenizer=model_dir, batch_size=4, max_length=64, **kw)


def _trainer(tmp_path, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw,
    )


def test_chunked_loss_matches_transformers(tiny_model_dir, tmp_path):
    dm = _datamodule(tmp_path, tiny_model_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = _module(tiny_model_dir)
    module.configure_model()
    module.model.eval()
    loss_sum, n = module.token_loss(batch)
    reference = module.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)


def test_packed_loss_equals_padded_loss(tiny_model_dir, tmp_path):
    """Padding-free packing must not let tokens attend across sequences: same loss as the padded batch."""
    padded_dm = _datamodule(tmp_path, tiny_model_dir)
    packed_dm = _datamodule(tmp_path, tiny_model_dir, packing=True)
    for dm in (padded_dm, packed_dm):
        dm.setup("fit")
    module = _module(tiny_model_dir)
    module.configure_model()
    module.model.eval()
    padded = next(iter(padded_dm.val_dataloader()))
    packed = next(iter(packed_dm.val_dataloader()))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0], "nothing was packed"
    assert int(packed["seq_lens"].numel()) == padded["input_ids"].shape[0]
    sum_a, n_a = module.token_loss(padded)
    sum_b, n_b = module.token_loss(packed)
    assert int(n_a) == int(n_b)
    torch.testing.assert_close(sum_a, sum_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_collator_loss_matches_unpacked_sequences(tiny_model_dir, tmp_path, attn):
    """PackedSFTCollator rows (several sequences a row, restarting position_ids, a padding tail) through SFTModule
    give the token-weighted loss, and the LoRA gradients, of the same sequences run one at a time without packing
    or padding: no token sees, or is predicted from, another sequence. fp32, LoRA B random so the adapter acts."""
    from lit_ft.data.collate import PackedSFTCollator

    train, _ = _write_data(tmp_path)
    dm = InstructionDataModule(train_file=train, val_split=0.0, tokenizer=tiny_model_dir, max_length=128, dedup=False)
    dm.setup("fit")
    rows = [dict(dm.train_dataset[i]) for i in range(len(dm.train_dataset))]
    for i, r in enumerate(rows):  # unequal lengths (cut 0-4 prompt tokens), so packed rows end unevenly
        cut = (i * 7) % 5
        r["input_ids"], r["labels"] = r["input_ids"][cut:], r["labels"][cut:]
    batch = PackedSFTCollator(dm.tokenizer.pad_token_id, max_length=128)(rows)
    starts = [int(n) for n in (batch["position_ids"] == 0).sum(1)]  # sequences a row (+1 where a padding tail)
    assert batch["input_ids"].shape[0] > 1 and min(starts) >= 2, starts
    assert int(batch["seq_lens"].sum()) < batch["input_ids"].numel(), "no packed row has a padding tail"
    assert (batch["labels"] != -100).any(1).all()

    torch.manual_seed(0)
    module = _module(tiny_model_dir, dtype="float32", attn_implementation=attn)
    module.configure_model()
    module.model.eval()
    lora = [p for n, p in module.model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)

    loss_sum, n_tokens = module.token_loss(batch)
    packed_grads = torch.autograd.grad(loss_sum / n_tokens, lora)

    sums, counts = [], []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        s, n = module.token_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "labels": torch.tensor([r["labels"]])})
        sums.append(s)
        counts.append(n)
    total = sum(counts)
    assert int(n_tokens) == int(total)
    reference = sum(sums) / total
    reference_grads = torch.autograd.grad(reference, lora)
    torch.testing.assert_close(loss_sum / n_tokens, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(packed_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sft")
    dm = _datamodule(tmp_path, tiny_model_dir)
    module = _module(tiny_model_dir)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=10)
    trainer = _trainer(tmp_path, max_steps=40, callbacks=[ckpt, ExportAdapter(str(tmp_path / "adapter"))],
                       num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    return dict(module=module, dm=dm, tmp=tmp_path, before=before, after=after, trainer=trainer)


def test_sft_lowers_validation_loss(trained):
    assert trained["after"] < trained["before"] - 0.5, (trained["before"], trained["after"])


def test_checkpoint_holds_adapter_only(trained, tiny_model_dir):
    state = torch.load(trained["tmp"] / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    trainable = {n for n, p in trained["module"].named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable
    assert all("lora_" in k for k in state["state_dict"])
    assert state["lit_ft_base"]["name_or_path"] == tiny_model_dir
    assert state["hyper_parameters"]["lora"]["r"] == 8  # plain dicts: loadable with weights_only=True


def test_resume_continues_from_last(trained, tiny_model_dir):
    tmp = trained["tmp"]
    module = _module(tiny_model_dir)
    trainer = _trainer(tmp / "resume", max_steps=42)
    trainer.fit(module, datamodule=trained["dm"], ckpt_path=str(tmp / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 42
    saved = torch.load(tmp / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 40


def test_resume_refuses_another_base(trained, tmp_path):
    from lit_ft.errors import ConfigError
    from tests.conftest import make_tiny_llama, make_tokenizer

    other = tmp_path / "other"
    tok = make_tokenizer(str(other))
    make_tiny_llama(str(other), len(tok), seed=1)
    trainer = _trainer(tmp_path, max_steps=42)
    with pytest.raises(ConfigError, match="trained on another base model"):
        trainer.fit(_module(str(other)), datamodule=trained["dm"], ckpt_path=str(trained["tmp"] / "ckpt" / "last.ckpt"))


def test_exported_adapter_loads_in_peft_and_merges(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_ft.cli.export import merge

    adapter = trained["tmp"] / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= {
        p.name for p in adapter.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(str(adapter))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    x = tok(["What is 2 plus 3?"], return_tensors="pt")
    ours = trained["module"].model.eval()(**x).logits
    torch.testing.assert_close(peft_model(**x).logits, ours, rtol=1e-5, atol=1e-5)

    merged_dir = merge(adapter, trained["tmp"] / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(merged.generate(**x, **kw), peft_model.generate(**x, **kw))


def test_adapter_from_checkpoint_matches_export(trained, tmp_path):
    from safetensors.torch import load_file

    from lit_ft.cli.export import adapter_from_checkpoint

    out = adapter_from_checkpoint(trained["tmp"] / "ckpt" / "last.ckpt", tmp_path / "from_ckpt")
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(trained["tmp"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_qlora_nf4_trains_on_cpu(tiny_model_dir, tmp_path):
    dm = _datamodule(tmp_path, tiny_model_dir)
    module = _module(tiny_model_dir, quantization="nf4", gradient_checkpointing=True)
    module.optim = OptimSpec(optimizer="paged_adamw_32bit", lr=1e-2, weight_decay=0.01, warmup_ratio=0.1)
    trainer = _trainer(tmp_path, max_steps=4, gradient_clip_val=1.0, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
