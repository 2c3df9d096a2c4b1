"""Checkpoints, exports and run directories under preemption, corruption and mistakes: the CLI's checkpoints export,
only lit_ft's modules are built, SIGTERM saves and exits non-zero, digests catch corruption, non-finite updates stop
the run, changed settings follow their rule, a changed base is refused, one run a directory, atomic exports, and the
loss is token-weighted across accumulation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.train import integrity, outputs, runs
from lit_ft.callbacks import ExportAdapter
from lit_ft.data.modules import InstructionDataModule
from lit_ft.errors import ConfigError
from lit_ft.cli.export import adapter_from_checkpoint
from lit_ft.train.guards import NonFiniteError
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.train.resume import AtomicCheckpointIO
from lit_ft.losses import masked_mean, masked_var, masked_whiten
from lit_ft.stages.sft import SFTModule
from tests.conftest import make_tiny_llama

REPO = Path(__file__).parent.parent
# Completions of different lengths (so micro-batches hold different numbers of loss tokens).
ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}." + " Indeed." * ((a + b) % 4)}
        for a in range(4) for b in range(4)]


@pytest.fixture()
def data_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


@pytest.fixture()
def base_dir(tiny_model_dir, tmp_path):
    """A private copy of the tiny model, so a test may change its weights."""
    d = tmp_path / "base"
    shutil.copytree(tiny_model_dir, d)
    return d


def _module(model_dir, lora=None, **optim) -> SFTModule:
    spec = dict(lr=1e-2, warmup_ratio=0.0, scheduler="constant")
    spec.update(optim)
    return SFTModule(base=ModelSpec(name_or_path=str(model_dir)), lora=lora or LoraSpec(r=4, alpha=8, dropout=0.0),
                     optim=OptimSpec(**spec))


def _dm(data, model_dir, batch_size=4):
    return InstructionDataModule(train_file=str(data), tokenizer=str(model_dir), batch_size=batch_size,
                                 max_length=48, val_split=0)


def _trainer(root, max_steps, callbacks=(), **kw):
    ckpt = ModelCheckpoint(dirpath=str(Path(root) / "ckpt"), save_last=True, every_n_train_steps=2)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), limit_val_batches=0,
                     num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=[ckpt, *callbacks], **kw)


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _cli_config(tmp_path, model_dir, data, max_steps=4) -> Path:
    """configs/sft.yaml pointed at the tiny model and a small data file, without W&B or sample generations."""
    cfg = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    root = str(tmp_path / "run")
    t = cfg["trainer"]
    t.update(default_root_dir=root, max_steps=max_steps, val_check_interval=min(max_steps, 4), limit_val_batches=1,
             logger=False, log_every_n_steps=1)
    keep = ("ModelCheckpoint", "ExportAdapter", "PrintMetrics")
    t["callbacks"] = [c for c in t["callbacks"] if c["class_path"].endswith(keep)]
    for c in t["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"]["dirpath"] = f"{root}/checkpoints"
        if c["class_path"].endswith("ExportAdapter"):
            c["init_args"]["dirpath"] = f"{root}/adapter"
        if c["class_path"].endswith("PrintMetrics"):
            c["init_args"]["every_n_steps"] = 1
    cfg["model"]["init_args"]["base"]["name_or_path"] = str(model_dir)
    cfg["model"]["init_args"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg["data"]["init_args"].update(train_file=str(data), val_file=str(data), max_length=48, batch_size=4)
    path = tmp_path / "sft_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


# ------------------------------------------------------------------------------------------------ export


def test_export_works_on_the_checkpoint_the_cli_writes(tiny_model_dir, data_file, tmp_path):
    from peft.utils import load_peft_weights

    cfg = _cli_config(tmp_path, tiny_model_dir, data_file)
    fit = _run([str(REPO / "train.py"), "fit", "--config", str(cfg)], cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "_class_path" in state["hyper_parameters"]  # what LightningCLI stores, and export used to choke on
    export = _run(["-m", "lit_ft.cli.export", "adapter", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")], cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    mine, fit_export = load_peft_weights(str(tmp_path / "x")), load_peft_weights(str(tmp_path / "run" / "adapter"))
    assert mine.keys() == fit_export.keys() and mine
    for k in mine:
        assert torch.equal(mine[k], fit_export[k]), k


def test_export_builds_only_lit_ft_modules(tmp_path):
    marker = tmp_path / "ran"
    evil = {"lit_ft_module": "os.system", "hyper_parameters": {"command": f"touch {marker}"}, "state_dict": {}}
    integrity.seal(evil)
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match=r"evil\.ckpt: refused: its 'lit_ft_module' entry names 'os\.system', which "
                                          r"is not one of lit_ft's modules.*nothing was imported or called"):
        adapter_from_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ preemption


class SignalAt(L.Callback):
    """Sends `signum` to this process at the end of training batch `batch` (1-based)."""

    def __init__(self, batch: int, signum=signal.SIGTERM):
        self.batch, self.signum = batch, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.batch:
            os.kill(os.getpid(), self.signum)


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(base_dir, data_file, tmp_path):
    # Uninterrupted: 6 optimizer steps of 2 accumulated micro-batches.
    L.seed_everything(0)
    whole = _module(base_dir, lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    _trainer(tmp_path / "whole", 6, accumulate_grad_batches=2).fit(whole, datamodule=_dm(data_file, base_dir, 2))

    # SIGTERM after micro-batch 5: the run finishes micro-batch 6 (the step), writes last.ckpt, exits with 143.
    L.seed_everything(0)
    first = _module(base_dir, lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    trainer = _trainer(tmp_path / "cut", 6, [SignalAt(5)], accumulate_grad_batches=2)
    with pytest.raises(runs.Preempted) as info:
        trainer.fit(first, datamodule=_dm(data_file, base_dir, 2))
    assert info.value.code == 143 and "preempted by SIGTERM" in str(info.value)
    state = integrity.load_verified(tmp_path / "cut" / "ckpt" / "last.ckpt")
    assert state["global_step"] == 3  # at the boundary of the step the signal arrived in, not mid-accumulation
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))

    L.seed_everything(0)
    second = _module(base_dir, lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    _trainer(tmp_path / "cut", 6, accumulate_grad_batches=2).fit(
        second, datamodule=_dm(data_file, base_dir, 2), ckpt_path="last")
    a, b = _trainable(whole), _trainable(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_through_the_cli_exits_143_with_a_checkpoint(tiny_model_dir, data_file, tmp_path):
    cfg = _cli_config(tmp_path, tiny_model_dir, data_file, max_steps=10_000)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", "--config", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # PrintMetrics prints a line per step: training has started
        lines.append(line)
        if line.startswith("[train step 3]"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 143, output[-3000:]
    assert "preempted by SIGTERM: checkpoint written to" in output
    state = integrity.load_verified(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert state["global_step"] >= 3


# ------------------------------------------------------------------------------------------------ integrity


def _flip_tensor_bytes(path: Path) -> None:
    """Flip bytes in the middle of the largest tensor record of a torch zip archive (stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start: start + 4] = bytes(b ^ 0x5A for b in raw[start: start + 4])
    path.write_bytes(bytes(raw))


def test_corrupted_and_truncated_checkpoints_are_refused_naming_the_good_one(base_dir, data_file, tmp_path):
    module = _module(base_dir)
    _trainer(tmp_path, 4).fit(module, datamodule=_dm(data_file, base_dir))
    ckpt_dir = tmp_path / "ckpt"
    last, good = ckpt_dir / "last.ckpt", ckpt_dir / "epoch=0-step=4.ckpt"
    assert last.exists() and good.exists()
    plain = torch.load(last, map_location="cpu", weights_only=True)  # loads silently: torch checks no CRC
    _flip_tensor_bytes(last)
    assert isinstance(torch.load(last, map_location="cpu", weights_only=True), dict)

    io = AtomicCheckpointIO(fallback_to_verified=False)
    with pytest.raises(integrity.CheckpointError, match=rf"{last}: corrupted: .*the newest checkpoint that verifies "
                                                        rf"is {good}"):
        io.load_checkpoint(last)
    with pytest.warns(UserWarning, match=rf"corrupted.*Resuming from {good} instead"):
        restored = AtomicCheckpointIO().load_checkpoint(last)  # `last` falls back, saying so
    assert restored["global_step"] == plain["global_step"] == 4

    half = ckpt_dir / "half.ckpt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(integrity.CheckpointError, match=rf"{half}: unreadable checkpoint .*verifies is {good}"):
        io.load_checkpoint(half)
    # A resumed fit from the corrupted `last` continues from the good one.
    resumed = _module(base_dir)
    trainer = _trainer(tmp_path, 6)
    with pytest.warns(UserWarning, match="Resuming from"):
        trainer.fit(resumed, datamodule=_dm(data_file, base_dir), ckpt_path=str(last))
    assert trainer.global_step == 6


def test_stale_temporaries_are_removed_at_the_next_start(base_dir, data_file, tmp_path):
    (tmp_path / "ckpt").mkdir()
    stale = [tmp_path / "ckpt" / ".last.ckpt.x1y2.tmp", tmp_path / ".adapter.tmp-abc"]
    stale[0].write_bytes(b"\0" * 1000)
    stale[1].mkdir()
    _trainer(tmp_path, 2).fit(_module(base_dir), datamodule=_dm(data_file, base_dir))
    assert not any(p.exists() for p in stale)


def test_a_non_finite_update_stops_the_run_before_it_is_saved(base_dir, data_file, tmp_path):
    # Adam with eps 0 (refused as a setting since; set here after construction, as code that builds its own
    # optimizer settings could): lora_B starts at 0, so lora_A's first gradient is exactly 0 and its update
    # 0/0 = NaN, although every gradient is finite (the gradient check cannot see it).
    module = _module(base_dir)
    module.optim.eps = 0.0
    with pytest.raises(NonFiniteError, match=r"optimizer step \d+ made trainable weights NaN/inf .*model\.optim\.lr"
                                             r".*newest checkpoint with finite weights: none"):
        _trainer(tmp_path, 6).fit(module, datamodule=_dm(data_file, base_dir))
    assert not list((tmp_path / "ckpt").glob("*.ckpt")) if (tmp_path / "ckpt").exists() else True


def test_a_checkpoint_holding_nan_weights_is_refused(base_dir, data_file, tmp_path):
    _trainer(tmp_path, 2).fit(_module(base_dir), datamodule=_dm(data_file, base_dir))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = state["state_dict"][name] * float("nan")
    integrity.seal(state)  # a digest that matches: only the finiteness check can catch it
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(integrity.CheckpointError, match=r"nan\.ckpt: 1 trainable tensors hold NaN/inf"):
        integrity.load_verified(tmp_path / "nan.ckpt")


# ------------------------------------------------------------------------------------------------ changed settings


class LrAt(L.Callback):
    def __init__(self):
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_resume_applies_a_new_lr_and_continues_a_longer_schedule(base_dir, data_file, tmp_path, caplog):
    cosine = dict(scheduler="cosine", warmup_ratio=0.0)
    full = LrAt()
    _trainer(tmp_path / "a", 8, [full]).fit(_module(base_dir, **cosine), datamodule=_dm(data_file, base_dir))
    with pytest.raises(runs.Preempted):  # the same 8-step run, stopped after step 4
        _trainer(tmp_path / "b", 8, [SignalAt(4)]).fit(_module(base_dir, **cosine), datamodule=_dm(data_file, base_dir))

    longer = LrAt()
    with caplog.at_level("INFO"):
        _trainer(tmp_path / "b", 12, [longer]).fit(_module(base_dir, lr=5e-3, **cosine),
                                                    datamodule=_dm(data_file, base_dir), ckpt_path="last")
    # The new peak lr applies (not the restored 1e-2) and the schedule continues from where it was at step 4
    # (half-way down an 8-step cosine: 0.5 x lr) instead of jumping to the 12-step cosine's value.
    assert longer.lr[4] == pytest.approx(5e-3 * 0.5)
    assert full.lr[4] == pytest.approx(1e-2 * 0.5)
    lrs = [longer.lr[s] for s in range(4, 12)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert "model.optim.lr changed since the checkpoint (0.01 -> 0.005)" in caplog.text
    assert "the run's length changed (8 -> 12 optimizer steps)" in caplog.text


def test_resume_refuses_a_new_lora_shape_and_changed_data(base_dir, data_file, tmp_path):
    _trainer(tmp_path, 2).fit(_module(base_dir), datamodule=_dm(data_file, base_dir))
    with pytest.raises(ConfigError, match=r"model\.lora\.r changed since the checkpoint \(4 -> 8\) and cannot change"):
        _trainer(tmp_path, 4).fit(_module(base_dir, lora=LoraSpec(r=8, alpha=8, dropout=0.0)),
                                  datamodule=_dm(data_file, base_dir), ckpt_path="last")
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(json.dumps(r) + "\n" for r in reversed(ROWS)))  # same rows, same count
    with pytest.raises(ConfigError, match=r"data\.train_file: the training data changed since the checkpoint"):
        _trainer(tmp_path, 4).fit(_module(base_dir), datamodule=_dm(reordered, base_dir), ckpt_path="last")


def test_resume_onto_changed_weights_at_the_same_path_is_refused(base_dir, data_file, tmp_path):
    module = _module(base_dir)
    _trainer(tmp_path, 2, [ExportAdapter(str(tmp_path / "adapter"))]).fit(module, datamodule=_dm(data_file, base_dir))
    vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    make_tiny_llama(str(base_dir), vocab_size=vocab, seed=1)  # other weights, same path and config
    with pytest.raises(ConfigError, match=r"another base model \(weights: checkpoint has '[0-9a-f]+', this run has "
                                          r"'[0-9a-f]+'"):
        _trainer(tmp_path, 4).fit(_module(base_dir), datamodule=_dm(data_file, base_dir), ckpt_path="last")
    with pytest.raises(ConfigError, match=r"model\.base\.adapter: .*adapter was trained on other base weights"):
        SFTModule(base=ModelSpec(name_or_path=str(base_dir), adapter=str(tmp_path / "adapter"))).configure_model()


# ------------------------------------------------------------------------------------------------ run directories


def test_a_second_run_into_a_directory_in_use_is_refused(base_dir, data_file, tmp_path):
    tmp_path.joinpath("ckpt").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(tmp_path / runs.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'started': 't', 'command': 'other run'}).encode())\n"
        "print('locked', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} .*other run"):
            _trainer(tmp_path, 2).fit(_module(base_dir), datamodule=_dm(data_file, base_dir))
    finally:
        holder.kill()
        holder.wait()
    _trainer(tmp_path, 2).fit(_module(base_dir), datamodule=_dm(data_file, base_dir))  # the holder died: free


def test_adapter_export_is_atomic_and_a_finished_run_writes_a_missing_one(base_dir, data_file, tmp_path):
    target = tmp_path / "exports" / "adapter"
    with outputs.atomic_directory(target) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    with pytest.raises(OSError), outputs.atomic_directory(target) as tmp:
        (tmp / "adapter_config.json").write_text('{"partial": true}')
        raise OSError("killed mid-export")
    assert json.loads((target / "adapter_config.json").read_text()) == {}  # the previous export, intact
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # no temporary left behind

    export = tmp_path / "run" / "adapter"
    _trainer(tmp_path / "run", 2, [ExportAdapter(str(export))]).fit(_module(base_dir),
                                                                   datamodule=_dm(data_file, base_dir))
    shutil.rmtree(export)
    _trainer(tmp_path / "run", 2, [ExportAdapter(str(export))]).fit(
        _module(base_dir), datamodule=_dm(data_file, base_dir), ckpt_path="last")
    assert (export / "adapter_config.json").exists() and (export / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ token weighting


class Grads(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_give_the_gradient_of_the_one_big_batch(base_dir, data_file, tmp_path):
    """Two micro-batches of 2 rows with different loss-token counts, accumulated, give the gradient of their 4 rows
    in one batch, and both equal an independent reference: the model's own token-mean loss over the 4 rows."""
    got = {}
    for name, (bsz, acc) in {"big": (4, 1), "accumulated": (2, 2)}.items():
        L.seed_everything(0)
        module, rec = _module(base_dir), Grads()
        dm = _dm(data_file, base_dir, bsz)
        _trainer(tmp_path / name, 1, [rec], accumulate_grad_batches=acc).fit(module, datamodule=dm)
        got[name] = rec.grads
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    batches = [b for _, b in zip(range(2), loader)]
    counts = [int((b["labels"] != -100).sum()) for b in batches]
    assert counts[0] != counts[1]

    L.seed_everything(0)
    ref = _module(base_dir)
    ref.configure_model()
    total = sum(ref.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].log_softmax(-1)
                .gather(-1, b["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
                .masked_fill(b["labels"][:, 1:] == -100, 0).sum() for b in batches)
    (-total / sum(counts)).backward()
    expected = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for k in expected:
        torch.testing.assert_close(got["big"][k], expected[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["accumulated"][k], expected[k], rtol=1e-4, atol=1e-7)


def test_masked_whiten_zeroes_masked_positions_and_never_scales_by_the_weight():
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[1.0, 0.5, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    expected = (x - mean) / torch.sqrt(var + 1e-8)
    assert out[0, 3] == 0
    torch.testing.assert_close(out[0, :3], expected[0, :3])  # position 1 is whitened, not halved
    shifted = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(shifted[0, :3], expected[0, :3] + mean)


def test_base_fingerprint_ignores_who_wrote_the_config_but_not_what_it_says(tmp_path):
    """The same weights saved by another transformers release (another `transformers_version`, `_name_or_path`)
    fingerprint the same, so an adapter moves between machines; a changed architecture field or weight file
    does not."""
    import json

    from lit_ft.models.identity import weights_fingerprint

    def write(folder, config, blob):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(blob)
        return weights_fingerprint(folder)

    config = {"model_type": "llama", "hidden_size": 64, "transformers_version": "5.24.0"}
    blob = bytes(range(256)) * 10
    here = write(tmp_path / "a", config, blob)
    there = write(tmp_path / "b", {**config, "transformers_version": "5.17.0", "_name_or_path": "/x"}, blob)
    other_shape = write(tmp_path / "c", {**config, "hidden_size": 128}, blob)
    other_weights = write(tmp_path / "d", config, blob[::-1])
    assert here is not None and here == there
    assert len({here, other_shape, other_weights}) == 3


def test_an_adapter_with_the_digest_of_before_the_config_change_still_matches_its_base(tmp_path):
    """Adapters and checkpoints written before config.json was read without `transformers_version` carry the raw
    config's digest: the same weights still match it; other weights do not."""
    import json

    from lit_ft.models.adapters import check_adapter_base
    from lit_ft.models.identity import _fingerprint, identity_diff, weights_fingerprint

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "transformers_version": "5.17.0"}))
    (base / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    current = {"name_or_path": str(base), "weights": weights_fingerprint(base)}
    old = _fingerprint(str(base.resolve()), (), legacy=True)
    assert old != current["weights"]
    assert identity_diff({"weights": old}, current) == {}
    assert identity_diff({"weights": "0123456789abcdef"}, current) == {"weights": ("0123456789abcdef", current["weights"])}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "lit_ft_base.json").write_text(json.dumps({"weights": old}))
    check_adapter_base(adapter, current, "model.sft_adapter")  # accepted
    (adapter / "lit_ft_base.json").write_text(json.dumps({"weights": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="model.sft_adapter: .* was trained on other base weights"):
        check_adapter_base(adapter, current, "model.sft_adapter")


def test_a_setting_added_since_the_checkpoint_is_not_read_as_a_change(base_dir):
    """A checkpoint written before a module argument or a spec field existed: the missing ones are the defaults
    that run used, so resuming says nothing changed (was, for PPO's new `compile`: `model.compile changed (None ->
    False)`)."""
    from lit_ft.train.checkpointing import settings_diff, with_defaults

    module = _module(base_dir)
    saved = {k: v for k, v in dict(module.hparams).items() if k not in ("compile", "max_consecutive_skips")}
    saved["lora"] = {k: v for k, v in dict(saved["lora"]).items() if k != "use_rslora"}  # at its default here
    assert settings_diff(saved, module.hparams, "model")  # the raw comparison sees both as changes
    assert settings_diff(with_defaults(saved, module), module.hparams, "model") == {}
