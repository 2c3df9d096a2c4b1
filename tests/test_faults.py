"""Issue 7: numerical faults (non-finite steps skipped and counted), out-of-memory advice, secrets, pickles."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.data.modules import InstructionDataModule
from lit_ft.errors import ConfigError, LitFTError
from lit_ft.train.guards import NonFiniteError, OOMAdvice, is_oom
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.stages.sft import SFTModule

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."}
        for a in range(4) for b in range(2)]


class FaultySFT(SFTModule):
    """SFTModule whose loss is NaN at the global steps in ``nan_steps``; records state around those steps."""

    nan_steps: set = set()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        watched = self.global_step in self.nan_steps
        if watched:
            self.before = (_trainable(self), copy.deepcopy(optimizer.optimizer.state_dict()))
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if watched:
            self.after = (_trainable(self), copy.deepcopy(optimizer.optimizer.state_dict()))


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _module(model_dir, nan_steps=(), **kw) -> FaultySFT:
    module = FaultySFT(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                       optim=OptimSpec(lr=1e-2, scheduler="linear", warmup_ratio=0.0), **kw)
    module.nan_steps = set(nan_steps)
    return module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("faults") / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(f)


def _fit(tmp_path, module, data_file, model_dir, max_steps, callbacks=(), **kw):
    dm = InstructionDataModule(train_file=data_file, tokenizer=model_dir, batch_size=4, max_length=48, val_split=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                        default_root_dir=str(tmp_path), limit_val_batches=0, **kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nan_step_is_skipped_counted_and_training_continues(tiny_model_dir, data_file, tmp_path, precision):
    module = _module(tiny_model_dir, nan_steps={2})
    with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient.*skipped"):
        trainer = _fit(tmp_path, module, data_file, tiny_model_dir, max_steps=5, precision=precision)
    # the NaN step changed neither the weights nor the optimizer state (AdamW's step count and moments)
    _assert_same(module.before[0], module.after[0])
    _assert_same(module.before[1], module.after[1])
    assert module.before[1]["state"][0]["step"] == 2
    # the scheduler advanced for the 4 good steps only; Lightning still counts the attempt as a global step
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4 and trainer.global_step == 5
    assert module.guard.skipped == 1 and module.guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    # training continued after the skip: every weight is finite and moved on from the skipped step
    final = _trainable(module)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], module.after[0][k]) for k in final)


class OneBadGradient(FaultySFT):
    """The loss stays finite; one element of one LoRA gradient turns NaN (or inf) after backward at step 2."""

    bad = float("nan")

    def on_after_backward(self):
        if self.global_step in self.nan_steps:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            grads[len(grads) // 2].view(-1)[0] = self.bad


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_bad_gradient_element_skips_the_step(tiny_model_dir, data_file, tmp_path, bad):
    """The guard checks every gradient in one multi-tensor pass: a single bad element in one of them is found."""
    module = OneBadGradient(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                            optim=OptimSpec(lr=1e-2, scheduler="linear", warmup_ratio=0.0))
    module.nan_steps, module.bad = {2}, bad
    with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient.*skipped"):
        _fit(tmp_path, module, data_file, tiny_model_dir, max_steps=4)
    _assert_same(module.before[0], module.after[0])
    _assert_same(module.before[1], module.after[1])
    assert module.guard.skipped == 1 and module.guard.stepped == 3


def test_consecutive_nans_stop_the_run_and_the_last_checkpoint_is_good(tiny_model_dir, data_file, tmp_path):
    module = _module(tiny_model_dir, nan_steps=set(range(2, 100)), max_consecutive_skips=3)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=1)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError) as info:
        _fit(tmp_path, module, data_file, tiny_model_dir, max_steps=20, callbacks=[ckpt])
    message = str(info.value)
    assert isinstance(info.value, LitFTError)
    assert "3 optimizer steps in a row" in message and "last checkpoint is still good" in message
    assert "model.optim.lr" in message and "model.max_consecutive_skips" in message
    assert module.guard.skipped == 3
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    good = module.before[0]  # weights before the first NaN step == after every skipped one
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    for name, tensor in state["state_dict"].items():
        torch.testing.assert_close(tensor, good[name], rtol=0, atol=0)
    # the skip counters ride in the checkpoint: a resumed run keeps counting where this one stopped
    saved = state["lit_ft_guard"]
    assert saved["skipped"] == saved["consecutive"] >= 2
    resumed = _module(tiny_model_dir)
    resumed.on_load_checkpoint(state)
    assert (resumed.guard.skipped, resumed.guard.consecutive) == (saved["skipped"], saved["consecutive"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_all_masked_batch_gives_a_zero_loss_joined_to_the_graph(tiny_model_dir):
    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    ids = torch.randint(3, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    loss = module.training_step(batch, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)


def test_max_consecutive_skips_must_be_positive():
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        SFTModule(max_consecutive_skips=0)


# ---------------------------------------------------------------------------------------------- out of memory


class OOMModel(L.LightningModule):
    def __init__(self, error: BaseException):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.error = error

    def training_step(self, batch, batch_idx):
        raise self.error

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _run_oom(tmp_path, error):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[OOMAdvice()])
    with pytest.raises(type(error)) as info:
        trainer.fit(OOMModel(error))
    return info.value


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
], ids=["OutOfMemoryError", "cuda-runtime-error"])
def test_oom_names_the_settings_that_reduce_memory(tmp_path, error):
    raised = _run_oom(tmp_path, error)
    assert raised is error  # the original error propagates (Lightning's teardown runs) ...
    notes = "\n".join(getattr(raised, "__notes__", []))  # ... with the advice printed under its traceback
    for setting in ("data.batch_size", "data.max_length", "model.base.gradient_checkpointing",
                    "model.base.quantization", "trainer.accumulate_grad_batches"):
        assert setting in notes
    assert str(error) in notes  # and quotes what the allocator said


def test_other_errors_get_no_memory_advice(tmp_path):
    raised = _run_oom(tmp_path, ValueError("something else"))
    assert not getattr(raised, "__notes__", None) and not is_oom(raised)


def test_configs_install_the_oom_callback():
    import yaml

    for name in ("sft.yaml", "sft_qlora.yaml"):
        cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / name).read_text())
        assert "lit_ft.OOMAdvice" in [c["class_path"] for c in cfg["trainer"]["callbacks"]], name


# ---------------------------------------------------------------------------------------------- secrets


def test_secrets_stay_out_of_config_checkpoint_and_output(tiny_model_dir, data_file, tmp_path, monkeypatch, capfd):
    from lit_ft.cli.app import main

    monkeypatch.setenv("WANDB_API_KEY", "secret-xyz")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    main([
        "fit", "--model", "lit_ft.stages.sft.SFTModule", "--model.base.name_or_path", tiny_model_dir,
        "--model.lora.r", "4", "--data", "lit_ft.data.modules.InstructionDataModule",
        "--data.train_file", data_file, "--data.val_split", "0", "--data.max_length", "48", "--data.batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.save_last=true",
    ])
    out = capfd.readouterr()
    config = next(tmp_path.rglob("config.yaml")).read_text()  # in the run's own directory (runs/<stage>/version_N)
    state = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    saved = repr({k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")})
    assert "SFTModule" in config and "hyper_parameters" in state
    for secret in ("secret-xyz", "hf_secret"):
        for where, text in (("config.yaml", config), ("checkpoint", saved), ("stdout", out.out), ("stderr", out.err)):
            assert secret not in text, f"{secret} leaked into {where}"
    assert os.environ["HF_TOKEN"] == "hf_secret"  # the run did not need to touch it either


class Payload:
    """Any class that is not a tensor or plain value: unpickling it would import and run code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    from lit_ft.cli.export import adapter_from_checkpoint

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"lit_ft_module": "lit_ft.stages.sft.SFTModule", "hyper_parameters": {"x": Payload()}}, ckpt)
    with pytest.raises(ConfigError, match=r"evil.ckpt: refused: the file holds pickled Python objects"):
        adapter_from_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trust_remote_code_is_off_by_default():
    import inspect

    from lit_ft.models import load_tokenizer

    assert ModelSpec().trust_remote_code is False
    assert inspect.signature(load_tokenizer).parameters["trust_remote_code"].default is False


def test_with_a_grad_scaler_only_the_loss_is_checked():
    """fp16 AMP (CUDA): inf gradients are the GradScaler's to skip; the guard must not take that step from it."""
    from types import SimpleNamespace

    from lit_ft.train.guards import NonFiniteGuard

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([float("inf"), 0.0])
    steps = []
    optimizer = SimpleNamespace(param_groups=[{"params": [param]}], step=lambda closure: steps.append(closure()),
                                zero_grad=lambda set_to_none: None)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), global_step=0,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d))
    module = SimpleNamespace(trainer=trainer, log=lambda *a, **k: None)
    guard = NonFiniteGuard()
    assert guard.optimizer_step(module, optimizer, lambda: torch.tensor(1.5)) and steps == [torch.tensor(1.5)]
    trainer.precision_plugin.scaler = None  # 32-true / bf16-mixed: the same gradients are a skipped step
    with pytest.warns(UserWarning, match="non-finite"):
        assert not guard.optimizer_step(module, optimizer, lambda: torch.tensor(1.5))
    assert len(steps) == 1 and guard.skipped == 1 and guard.last_skipped


def test_reward_module_skips_a_nan_step(tiny_model_dir, tmp_path):
    """The reward stage uses the same guard: a NaN loss leaves the adapter, head and optimizer untouched."""
    from lit_ft.data.modules import PreferenceDataModule
    from lit_ft.stages.reward import RewardModule

    class FaultyRM(RewardModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 1 else loss

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            before = _trainable(self) if self.global_step == 1 else None
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            if before is not None:
                self.unchanged = all(torch.equal(before[k], v) for k, v in _trainable(self).items())

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a} plus {a}?", "chosen": str(2 * a), "rejected": str(2 * a + 1)})
                             + "\n" for a in range(8)))
    dm = PreferenceDataModule(train_file=str(pairs), tokenizer=tiny_model_dir, batch_size=2, val_split=0)
    module = FaultyRM(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                      optim=OptimSpec(lr=1e-2, warmup_ratio=0.0), normalize_on_fit_end=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        trainer.fit(module, datamodule=dm)
    assert module.unchanged and module.guard.skipped == 1
    assert all(torch.isfinite(t).all() for t in _trainable(module).values())
