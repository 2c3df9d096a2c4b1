"""Reward modelling: where the score is read, the Bradley-Terry loss at the module level, the export format
(head saved and reloaded three ways), k-bit builds, slim checkpoints and resume. Tiny models only."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from lit_ft.train import checkpointing

from lit_ft.models import adapters
from lit_ft.online import scoring
from lit_ft.models import LoraSpec, ModelSpec, trainable_state_dict
from lit_ft.train.optim import OptimSpec
from lit_ft.stages.reward import RewardModule

PAIRS = [
    ("What is 2 plus 3?", "The answer is 5.", "The answer is 6."),
    ("What is 12 plus 30?", "The answer is 42.", "The answer is 24."),
    ("Add the numbers 3 and 4.", "7", "8"),
    ("hello there", "hi, how can I help you today?", "wrong"),
]


def _module(tiny_model_dir, quantization="none", **kw) -> RewardModule:
    # a floor above 0: test_slim_checkpoint_resume_and_export extends a finished run, which lr 0 would refuse
    module = RewardModule(ModelSpec(name_or_path=tiny_model_dir, quantization=quantization),
                          LoraSpec(r=4, dropout=0.0), OptimSpec(lr=1e-2, warmup_steps=0, min_lr_ratio=0.1), **kw)
    module.configure_model()
    return module


def _texts(tok, pairs=PAIRS):
    """Chat-rendered chosen and rejected texts, each ending with EOS (== pad), like the data module's rows."""
    def render(p, r):
        return tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)
    return [render(p, c) for p, c, _ in pairs], [render(p, r) for p, _, r in pairs]


def _batch(tok, pairs=PAIRS, margin=None):
    chosen, rejected = _texts(tok, pairs)
    enc = tok(chosen + rejected, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    m = torch.zeros(len(pairs)) if margin is None else torch.tensor(margin, dtype=torch.float)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "margin": m}


class _Batches(L.LightningDataModule):
    """Fixed hand-built preference batches (the reward module relies on batch keys only)."""

    def __init__(self, batches, tokenizer):
        super().__init__()
        self.batches, self.tokenizer = batches, tokenizer

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.batches[:1], batch_size=None)


def _trainer(tmp_path, max_steps, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    return L.Trainer(max_steps=max_steps, **{**defaults, **kw})


# ---------------------------------------------------------------------------------------------- pooling


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert scoring.last_token_index(right).tolist() == [2, 4, 0]
    assert scoring.last_token_index(left).tolist() == [4, 4, 4]


def test_scores_from_hidden_reads_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    head = torch.nn.Linear(3, 1, bias=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    expected = head(torch.stack([hidden[0, 1], hidden[1, 3]])).squeeze(-1)
    torch.testing.assert_close(scoring.scores_from_hidden(hidden, mask, head), expected)


def test_reward_is_independent_of_padding_side_and_batchmates(tiny_model_dir, tiny_tokenizer):
    """pad == EOS here, and each text ends with EOS: a pad-id search would read the wrong token."""
    module = _module(tiny_model_dir)
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    chosen, rejected = _texts(tok)
    texts = chosen + rejected
    scorer = scoring.RewardScorer(module.model, tok)
    alone = torch.cat([scorer.score([t]) for t in texts])
    right = scorer.score(texts, batch_size=8)
    enc = tok(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    left = scorer.score_ids(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- loss


def _bt(diff: float) -> float:
    return math.log1p(math.exp(-diff))  # -log sigmoid(diff)


@pytest.mark.parametrize("use_margin, center_coef", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_module_loss_matches_hand_computed(tiny_model_dir, use_margin, center_coef):
    module = _module(tiny_model_dir, use_margin=use_margin, center_coef=center_coef)
    # rows: chosen 2, 0 then rejected 1, 1
    module.rewards = lambda batch: torch.tensor([2.0, 0.0, 1.0, 1.0], requires_grad=True)
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "margin": torch.tensor([0.5, 0.0])}
    loss, r_c, r_r = module.pair_loss(batch)
    m = (0.5, 0.0) if use_margin else (0.0, 0.0)
    expected = (_bt(2 - 1 - m[0]) + _bt(0 - 1 - m[1])) / 2 + center_coef * ((2 + 1) ** 2 + (0 + 1) ** 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert r_c.tolist() == [2.0, 0.0] and r_r.tolist() == [1.0, 1.0]


def test_one_forward_pass_of_2b_rows_and_val_metrics(tiny_model_dir, tiny_tokenizer, monkeypatch):
    module = _module(tiny_model_dir)
    decoder, _ = scoring.decoder_and_head(module.model)
    shapes = []
    decoder.register_forward_hook(lambda mod, args, kwargs, out: shapes.append(kwargs["input_ids"].shape),
                                  with_kwargs=True)
    batch = _batch(tiny_tokenizer)
    module.training_step(batch, 0)
    assert len(shapes) == 1 and shapes[0][0] == 2 * len(PAIRS)
    # Validation metrics against rewards computed directly.
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(module, "_trainer", type("T", (), {"sanity_checking": False})())
    module.eval()
    with torch.no_grad():
        r = module.rewards(batch)
        module.validation_step(batch, 0)
        module.on_validation_epoch_end()
    r_c, r_r = r.chunk(2)
    assert logged["val/accuracy"] == pytest.approx((r_c > r_r).float().mean().item())
    assert logged["val/margin"] == pytest.approx((r_c - r_r).mean().item(), abs=1e-6)
    assert logged["val/reward_mean"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert logged["val/reward_std"] == pytest.approx(r.std(unbiased=False).item(), abs=1e-5)
    assert module.reward_stats.tolist() == pytest.approx([r.mean().item(), r.std(unbiased=False).item()], abs=1e-5)


def test_accuracy_per_subset_from_the_group_field(tiny_model_dir, tmp_path):
    """PreferenceDataModule(group_field=...) -> val/accuracy/<subset>, each the share of its own pairs ranked right."""
    from lit_ft.data.modules import PreferenceDataModule

    kinds = ["near", "far", "near", "far"]
    rows = [{"prompt": p, "chosen": c, "rejected": r, "kind": k} for (p, c, r), k in zip(PAIRS, kinds)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PreferenceDataModule(train_file=str(tmp_path / "val.jsonl"), val_file=str(tmp_path / "val.jsonl"),
                              tokenizer=tiny_model_dir, group_field="kind", batch_size=3, max_length=64)
    module = _module(tiny_model_dir)
    with torch.no_grad():  # rewards that differ between pairs
        for n, p in module.model.named_parameters():
            if "lora_B" in n or "score" in n:
                p.add_(torch.randn_like(p))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert dm.val_groups == ["far", "near"]
    right, groups = [], []
    with torch.no_grad():  # the same batches, recomputed directly
        for batch in dm.val_dataloader():
            r_c, r_r = module.eval().rewards(batch).chunk(2)
            right += (r_c > r_r).tolist()
            groups += batch["group"]
    assert groups == kinds
    for kind in ("near", "far"):
        expected = sum(ok for ok, k in zip(right, kinds) if k == kind) / kinds.count(kind)
        assert metrics[f"val/accuracy/{kind}"] == pytest.approx(expected)
    assert metrics["val/accuracy"] == pytest.approx(sum(right) / len(right))
    # A pair without a subset name is an error naming the file, line and field.
    from lit_ft.errors import DataError

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "kind": None}) + "\n")
    bad = PreferenceDataModule(train_file=str(tmp_path / "bad.jsonl"), val_split=0.0, tokenizer=tiny_model_dir,
                               group_field="kind")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field .kind.: expected a subset name"):
        bad.setup("fit")


# ---------------------------------------------------------------------------------------------- export


def test_head_saved_and_reloaded_three_ways(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tok = tiny_tokenizer
    module = _module(tiny_model_dir)
    with torch.no_grad():  # a head and adapter unlike any fresh initialisation
        for n, p in module.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    module.reward_stats.copy_(torch.tensor([0.3, 2.0], dtype=torch.float64))
    out = module.save_adapter(tmp_path / "rm", tokenizer=tok)
    assert adapters.read_base_identity(out) == module.base.identity()

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        head_key = [k for k in f.keys() if k.endswith("score.weight")]
        assert len(head_key) == 1
        torch.testing.assert_close(f.get_tensor(head_key[0]), scoring.decoder_and_head(module.model)[1].weight)
    assert (out / "tokenizer_config.json").exists()
    gain, bias = adapters.read_normalization(out)
    assert (gain, bias) == pytest.approx((0.5, -0.15))

    chosen, rejected = _texts(tok)
    texts = chosen + rejected
    raw = scoring.RewardScorer(module.model, tok).score(texts, normalize=False)

    # 1. the one-call loader, normalized and raw
    scorer = scoring.RewardScorer.from_pretrained(out)
    torch.testing.assert_close(scorer.score(texts, normalize=False), raw)
    torch.testing.assert_close(scorer.score(texts), raw * gain + bias)
    # 2. plain PEFT onto a fresh AutoModelForSequenceClassification
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    torch.testing.assert_close(scoring.RewardScorer(peft_model, tok).score(texts, normalize=False), raw)
    # 3. HF's own forward (its pad-id search agrees with ours on rows without EOS)
    plain = ["What is 2 plus 3? The answer is 5.", "hello there"]
    enc = tok(plain, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = peft_model(**enc).logits.squeeze(-1)
    torch.testing.assert_close(logits, scorer.score(plain, normalize=False))
    # the standalone head loader
    head = adapters.load_score_head(out)
    torch.testing.assert_close(head.weight, scoring.decoder_and_head(module.model)[1].weight)


def test_normalization_files_round_trip(tmp_path):
    assert adapters.read_normalization(tmp_path) == (1.0, 0.0)
    adapters.write_normalization(tmp_path, 2.0, -1.0)
    assert json.loads((tmp_path / "reward_normalization.json").read_text()) == {"gain": 2.0, "bias": -1.0}
    assert adapters.read_normalization(tmp_path) == (2.0, -1.0)
    with pytest.raises(ValueError):
        adapters.write_normalization(tmp_path, float("nan"), 0.0)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_kbit_builds_train_one_step(tiny_model_dir, tiny_tokenizer, tmp_path, quantization):
    module = RewardModule(ModelSpec(name_or_path=tiny_model_dir, quantization=quantization),
                          LoraSpec(r=4, dropout=0.0), OptimSpec(lr=1e-2, warmup_steps=0))
    trainer = _trainer(tmp_path, 1, enable_checkpointing=False, limit_val_batches=0)
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.clone() for k, v in trainable_state_dict(pl_module).items()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=_Batches([_batch(tiny_tokenizer)], tiny_tokenizer))
    after = trainable_state_dict(module)
    assert any(k.endswith("score.modules_to_save.default.weight") for k in after)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert any("score" in k for k in changed) and any("lora_" in k for k in changed)


def test_slim_checkpoint_resume_and_export(tiny_model_dir, tiny_tokenizer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_ft.callbacks import ExportAdapter

    tok = tiny_tokenizer
    batches = [_batch(tok, PAIRS[:2]), _batch(tok, PAIRS[2:])]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/accuracy", mode="max")
    module = _module(tiny_model_dir)
    _trainer(tmp_path, 2, callbacks=[ckpt], val_check_interval=2).fit(module, datamodule=_Batches(batches, tok))

    # weights_only=False: the hyper-parameters hold lit_ft dataclasses (see the report on ExportAdapter(best=True))
    state = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable | {"reward_stats"}
    assert state["lit_ft_base"]["name_or_path"] == tiny_model_dir

    resumed = _module(tiny_model_dir)
    restored = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update({k: v.clone() for k, v in trainable_state_dict(pl_module).items()})

    export = ExportAdapter(dirpath=str(tmp_path / "rm"))
    trainer = _trainer(tmp_path, 4, callbacks=[Snapshot(), export], val_check_interval=2, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=_Batches(batches, tok), ckpt_path=ckpt.last_model_path, weights_only=False)
    assert trainer.global_step == 4
    assert restored.keys() == trainable and all(torch.equal(restored[k], state["state_dict"][k]) for k in trainable)
    # The export's normalization standardises the last validation epoch's rewards.
    scorer = scoring.RewardScorer.from_pretrained(tmp_path / "rm")
    chosen, rejected = _texts(tok, PAIRS[:2])
    normalized = scorer.score(chosen + rejected)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normalized.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_missing_head_is_refused(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir)
    module.model.save_pretrained(tmp_path / "rm")
    path = tmp_path / "rm" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(path)).items() if "score" not in k}, str(path))
    with pytest.raises(ValueError, match="score"):
        adapters.load_score_head(tmp_path / "rm")
    with pytest.raises(ValueError, match="head"):
        scoring.RewardScorer.from_pretrained(tmp_path / "rm")


def test_a_bfloat16_base_trains_its_score_head_in_float32(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Adam moves each weight by about lr a step; in bfloat16 a step far below the weights' spacing rounds away (at
    |w| ~ 0.02 the spacing is 1.2e-4), so a bf16 head would not learn at small learning rates. Every weight of the
    head moves on the first step, by what float32 Adam gives."""
    module = RewardModule(ModelSpec(name_or_path=tiny_model_dir, dtype="bfloat16"), LoraSpec(r=4, dropout=0.0),
                          OptimSpec(lr=1e-5, warmup_steps=0, scheduler="constant"))
    trainer = _trainer(tmp_path, 1, enable_checkpointing=False, limit_val_batches=0)
    before = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in trainable_state_dict(pl_module).items() if "score" in k})

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=_Batches([_batch(tiny_tokenizer)], tiny_tokenizer))
    (key, start), = before.items()
    after = trainable_state_dict(module)[key]
    assert start.dtype == after.dtype == torch.float32
    step = (after - start).abs()
    assert bool((step > 0).all()) and torch.allclose(step, torch.full_like(step, 1e-5), rtol=0.05)
