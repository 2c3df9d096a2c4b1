"""What was written against the layout before the subpackages (2026-12-06) keeps working: the shipped configs of then
load with one warning naming the new paths, old module paths import as the modules they became, and a checkpoint and
adapters written by that code (tests/fixtures/premove, see its README) resume, export and score."""

from __future__ import annotations

import importlib
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lit_ft
from lit_ft.cli.app import main

FIXTURES = Path(__file__).parent / "fixtures" / "premove"
OLD_CONFIGS = sorted((FIXTURES / "configs_before").rglob("*.yaml"))


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Old paths warn once a process: forget what this process has said and imported under old names."""
    monkeypatch.setattr(lit_ft, "WARNED", set())
    for old in lit_ft.MOVED:
        monkeypatch.delitem(sys.modules, old, raising=False)


def moved_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning) and "lit_ft." in str(w.message)]


@pytest.mark.parametrize("config", OLD_CONFIGS, ids=lambda p: str(p.relative_to(FIXTURES / "configs_before")))
def test_a_config_of_the_old_layout_loads_with_one_warning(config, fresh_warnings, capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    said = moved_warnings(record)
    assert len(said) == 1, said
    old = {line.split("class_path:")[1].split("#")[0].strip() for line in config.read_text().splitlines()
           if "class_path: lit_ft." in line}
    for path in old:
        if lit_ft.public_name(path):
            assert f"{path} -> {lit_ft.public_name(path)}" in said[0]
    assert "class_path:" in capsys.readouterr().out


@pytest.mark.parametrize("old", sorted(lit_ft.MOVED))
def test_an_old_module_path_imports_the_new_module_with_a_warning(old, fresh_warnings):
    with pytest.warns(FutureWarning, match=f"{old} has moved to {lit_ft.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(lit_ft.MOVED[old])


def test_every_public_name_resolves_and_configs_name_only_those():
    for name in lit_ft.__all__:
        assert getattr(lit_ft, name).__name__ == name
    shipped = Path(__file__).parents[1] / "configs"
    for config in shipped.rglob("*.yaml"):
        for line in config.read_text().splitlines():
            if "class_path: lit_ft." in line:
                path = line.split("class_path:")[1].split("#")[0].strip()
                assert path.count(".") == 1, f"{config.name} names {path}: name it from lit_ft"


def _tiny_fit_args(stage: str, out: Path) -> list[str]:
    module, data, rows = {"sft": ("lit_ft.sft.SFTModule", "lit_ft.data.modules.InstructionDataModule", "sft.jsonl"),
                          "reward": ("lit_ft.reward.RewardModule", "lit_ft.data.modules.PreferenceDataModule",
                                     "pairs.jsonl")}[stage]
    return ["fit", "--model", module, "--model.base.name_or_path", str(FIXTURES / "base"), "--model.lora.r", "4",
            "--model.lora.alpha", "8", "--data", data, "--data.train_file", str(FIXTURES / rows),
            "--data.val_split", "0", "--data.max_length", "48", "--data.batch_size", "4",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(out / "runs" / stage),
            "--trainer.plugins", "lit_ft.resume.AtomicCheckpointIO",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath=checkpoints",
            "--trainer.callbacks.save_last=true"]  # as the fixtures were written (tests/fixtures/premove/README.md)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_checkpoint_of_the_old_layout_resumes_and_exports(stage, tmp_path, fresh_warnings):
    old = tmp_path / "old.ckpt"
    shutil.copy(FIXTURES / f"{stage}.ckpt", old)
    assert torch.load(old, weights_only=True)["lit_ft_module"].startswith(f"lit_ft.{stage}.")  # the old path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        main([*_tiny_fit_args(stage, tmp_path), "--trainer.max_steps", "8", "--ckpt_path", str(old)])
    last = next((tmp_path / "runs" / stage).rglob("last.ckpt"))
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 8  # continued from step 2, not restarted
    assert state["lit_ft_module"] == {"sft": "lit_ft.SFTModule", "reward": "lit_ft.RewardModule"}[stage]
    saved = next((tmp_path / "runs" / stage).rglob("config.yaml")).read_text()  # the run's config: public paths only
    named = [line.split("class_path:")[1].strip() for line in saved.splitlines() if "class_path: lit_ft." in line]
    assert named and all(path.count(".") == 1 for path in named), named
    for ckpt, out in ((old, tmp_path / "from_old"), (last, tmp_path / "from_new")):
        main(["export", "adapter", "--ckpt", str(ckpt), "--out", str(out), "--base", str(FIXTURES / "base")])
        assert (out / "adapter_model.safetensors").is_file()


def test_adapters_of_the_old_layout_load(tmp_path):
    from lit_ft import ModelSpec, RewardScorer
    from lit_ft.models import build_model

    base = ModelSpec(name_or_path=str(FIXTURES / "base"), dtype="float32")
    scorer = RewardScorer.from_pretrained(FIXTURES / "reward_adapter", base=base)
    scores = scorer.score(["What is 1 plus 1? The answer is 2.", "What is 1 plus 1? The answer is 3."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    spec = ModelSpec(name_or_path=str(FIXTURES / "base"), dtype="float32", adapter=str(FIXTURES / "sft_adapter"))
    model = build_model(spec, None, trainable=False)
    trained = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert trained  # the adapter's trained weights, not a fresh zero-initialised LoRA
