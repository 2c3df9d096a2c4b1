"""Exact resume (a killed run continued from `last.ckpt` repeats the uninterrupted one bit for bit), the
resumable loader, atomic checkpoint writes, and exporting the best checkpoint's adapter."""

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
from lit_ft.optim import OptimSpec
from lit_ft.resume import AtomicCheckpointIO, ResumableDataLoader, ResumeRNG
from lit_ft.sft import SFTModule

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(4) for b in range(4)]
TOTAL = 12  # 16 rows / batch 4 = 4 steps an epoch: 3 epochs


class Killed(RuntimeError):
    pass


class Recorder(L.Callback):
    """Per-step training losses (exact tensors), and a simulated kill after a given step's checkpoint."""

    def __init__(self, kill_after: int | None = None):
        self.losses: dict[int, torch.Tensor] = {}
        self.kill_after = kill_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_after is not None and trainer.global_step == self.kill_after:
            raise Killed(f"killed after step {self.kill_after}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].detach().clone()


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_data")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    dm = InstructionDataModule(train_file=str(d / "train.jsonl"), val_file=str(d / "val.jsonl"),
                               tokenizer=tiny_model_dir, batch_size=4, max_length=64)
    dm.setup("fit")
    return dm


def _module(model_dir) -> SFTModule:
    # Dropout on (RNG matters), a schedule that depends on the step count, weight decay.
    return SFTModule(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.2),
                     optim=OptimSpec(lr=1e-2, weight_decay=0.01, warmup_ratio=0.25, scheduler="cosine"))


def _fit(root: Path, model_dir, dm, recorder, ckpt_path=None, every=1, **kw):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, every_n_train_steps=every, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=TOTAL, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root), callbacks=[ckpt, recorder], plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0, limit_val_batches=1, **kw,
    )
    module = _module(model_dir)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def _adapter(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory):
    rec = Recorder()
    module, _ = _fit(tmp_path_factory.mktemp("whole"), tiny_model_dir, data, rec, every=TOTAL)
    return rec.losses, _adapter(module)


@pytest.fixture(scope="module")
def killed(tiny_model_dir, data, tmp_path_factory):
    """kill_after -> (checkpoint dir of a run killed after that step, its recorded losses); runs once each."""
    runs = {}

    def run(kill_after: int):
        if kill_after not in runs:
            root = tmp_path_factory.mktemp(f"killed_{kill_after}")
            rec = Recorder(kill_after=kill_after)
            with pytest.raises(Killed):
                _fit(root, tiny_model_dir, data, rec, every=kill_after)
            runs[kill_after] = root / "ckpt", rec.losses
        return runs[kill_after]

    return run


@pytest.mark.parametrize("kill_after", [7, 8], ids=["mid_epoch", "epoch_end"])
def test_killed_run_resumes_exactly(kill_after, uninterrupted, killed, tiny_model_dir, data, tmp_path):
    """Steps after the kill and the final adapter equal the uninterrupted run's exactly (torch.equal)."""
    losses, weights = uninterrupted
    ckpt_dir, first = killed(kill_after)
    assert sorted(first) == list(range(1, kill_after + 1))
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == kill_after and "ResumeRNG" in state["callbacks"]
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state == {"epoch": 1, "position": 4 * (kill_after - 4), "seed": 0, "size": 16}

    second = Recorder()
    module, trainer = _fit(tmp_path, tiny_model_dir, data, second, ckpt_path=str(ckpt_dir / "last.ckpt"),
                           every=TOTAL)
    assert trainer.global_step == TOTAL
    assert sorted(second.losses) == list(range(kill_after + 1, TOTAL + 1))
    for step, loss in second.losses.items():
        assert torch.equal(loss, losses[step]), (step, loss.item(), losses[step].item())
    resumed = _adapter(module)
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_without_rng_state_dropout_differs(uninterrupted, killed, tiny_model_dir, data, tmp_path):
    """The RNG callback is what makes dropout repeat: dropping its state changes the steps after a resume."""
    losses, _ = uninterrupted
    ckpt_dir, _ = killed(7)
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    del state["callbacks"]["ResumeRNG"]
    torch.save(state, tmp_path / "no_rng.ckpt")
    rec = Recorder()
    _fit(tmp_path, tiny_model_dir, data, rec, ckpt_path=str(tmp_path / "no_rng.ckpt"), every=TOTAL)
    assert not torch.equal(rec.losses[8], losses[8])


def test_loader_resumes_mid_epoch_and_across_world_sizes():
    ds = list(range(10))
    whole = ResumableDataLoader(ds, batch_size=2, seed=3)
    whole.sampler.set_epoch(1)
    expected = [b.tolist() for b in whole]
    assert sorted(sum(expected, [])) == ds

    part = ResumableDataLoader(ds, batch_size=2, seed=3)
    part.sampler.set_epoch(1)
    it = iter(part)
    seen = [next(it).tolist() for _ in range(2)]
    state = part.state_dict()
    assert state == {"epoch": 1, "position": 4, "seed": 3, "size": 10}

    again = ResumableDataLoader(ds, batch_size=2, seed=3)
    again.load_state_dict(state)
    again.sampler.set_epoch(1)  # what Lightning does at the start of the (resumed) epoch
    assert seen + [b.tolist() for b in again] == expected
    assert len(again) == 5  # the full epoch: Lightning's counters already hold the consumed batches

    # Two ranks continuing from the same global position split exactly the samples one rank had left.
    shards = []
    for rank in range(2):
        loader = ResumableDataLoader(ds, batch_size=1, seed=3)
        loader.sampler.num_replicas, loader.sampler.rank = 2, rank
        loader.load_state_dict(state)
        shards += [int(b) for b in loader]
    assert sorted(shards) == sorted(sum(expected[2:], []))

    # The next epoch starts at its beginning, in a new order.
    again.sampler.set_epoch(2)
    nxt = [b.tolist() for b in again]
    assert sorted(sum(nxt, [])) == ds and nxt != expected


def test_rng_callback_round_trips_every_generator():
    import random

    import numpy as np

    cb = ResumeRNG()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = cb.state_dict()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    cb.load_state_dict(state)
    cb.on_train_batch_start(None, None, None, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk died mid-save")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="mid-save"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()

    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial temp file left behind
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


class _Opaque:  # any pickled object that is not a tensor or a plain value
    pass


def test_checkpoint_io_loads_weights_only(tmp_path):
    torch.save({"x": _Opaque()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_export_adapter_best_exports_best_not_last(tiny_model_dir, data, tmp_path):
    """With best=True the exported adapter holds the weights of the best-scoring checkpoint."""
    from safetensors.torch import load_file

    class Score(L.Callback):  # a monitored metric that is best at step 2 of 4
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log("score", float(abs(trainer.global_step - 2)))

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="score", mode="min", save_top_k=1,
                           every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[Score(), ckpt, ExportAdapter(str(tmp_path / "adapter"), best=True)])
    module = _module(tiny_model_dir)
    trainer.fit(module, datamodule=data)
    assert Path(ckpt.best_model_path).name == "epoch=0-step=2.ckpt"

    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert len(exported) == len(best) > 0
    for key, value in exported.items():
        name = next(k for k in best if k.endswith(key.replace(".weight", ".default.weight")))
        assert torch.equal(value, best[name])
    assert any(not torch.equal(best[k], last[k]) for k in best)
