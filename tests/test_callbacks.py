"""Callbacks that talk to W&B: offline by default, sample tables reach the run file, no secrets on disk."""

from __future__ import annotations

import pytest


def test_offline_by_default_and_tables_reach_the_run(tmp_path, monkeypatch):
    from lit_ft.callbacks import WandbLogger, log_table

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a stored key
    logger = WandbLogger(project="lit_ft_test", save_dir=str(tmp_path / "runs"))
    assert logger._offline

    class Trainer:
        loggers = [logger]
        global_step = 3

    log_table(Trainer, "ppo/samples", ["prompt", "response", "score"], [["What is 2 + 2?", "2 + 2 = 4", 1.0]])
    logger.experiment.finish()
    tables = list((tmp_path / "runs").rglob("*.table.json"))
    assert [t.name for t in tables if t.name.startswith("samples")], f"no table file: {tables}"
    assert "2 + 2 = 4" in tables[0].read_text()


def test_credentials_switch_the_logger_online(tmp_path, monkeypatch):
    from lit_ft import callbacks

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    seen = {}
    monkeypatch.setattr(callbacks._LightningWandbLogger, "__init__",
                        lambda self, **kw: seen.update(kw))
    callbacks.WandbLogger(save_dir=str(tmp_path))
    assert seen["offline"] is False


def test_resolve_callable_names_bad_paths():
    from lit_ft.callbacks import resolve_callable
    from lit_ft.tasks import correctness_reward

    assert resolve_callable("lit_ft.tasks.correctness_reward") is correctness_reward
    with pytest.raises(ValueError, match="not a dotted path"):
        resolve_callable("correctness_reward")
