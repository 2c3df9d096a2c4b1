"""RLHF on one file of preference pairs with the shipped overlays (`configs/recipes/hh_rlhf/`), as the README runs it:
SFT on the chosen side -> reward model -> PPO against it (and GRPO, DPO from the same SFT run) -> `lit-ft judge`,
each stage finding the previous one under `runs/hh_*/latest`, on the tiny model and HH-RLHF text pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_ft.cli.app import main

ROWS = [(a, b) for a in range(4) for b in range(4)]


def hh(a: int, b: int, answer: str, turns: int) -> str:
    chat = "".join(f"\n\nHuman: hi {i}\n\nAssistant: hello {i}" for i in range(turns))
    return f"{chat}\n\nHuman: What is {a} plus {b}?\n\nAssistant: {answer}"


@pytest.fixture
def pairs(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    rows = [{"chosen": hh(a, b, f"The answer is {a + b}.", (a + b) % 2),
             "rejected": hh(a, b, f"The answer is {a + b + 1}.", (a + b) % 2)} for a, b in ROWS]
    for name, part in (("pairs.jsonl", rows), ("held.jsonl", rows[:4])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path


def fit(stage: str, model: str, *extra: str) -> None:
    main(["fit", "--config", stage, "--config", f"recipes/hh_rlhf/{stage}", "--data.train_file", "pairs.jsonl",
          "--model.base.name_or_path", model, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.precision", "32-true", *extra])


def test_the_readme_pipeline_runs_on_one_file_of_pairs(pairs, tiny_model_dir, capsys):
    small = ["--data.max_length", "96", "--data.batch_size", "4"]
    fit("sft", tiny_model_dir, *small, "--trainer.max_steps", "2")
    fit("reward", tiny_model_dir, *small, "--trainer.max_steps", "2")
    online = ["--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
              "--model.sampling.max_new_tokens", "4", *small]
    fit("ppo", tiny_model_dir, *online, "--model.ppo.mini_batch_size", "4")
    fit("grpo", tiny_model_dir, *online, "--model.grpo.mini_batch_size", "16")
    fit("dpo", tiny_model_dir, *small, "--trainer.max_steps", "2")
    for stage in ("sft", "reward", "ppo", "grpo", "dpo"):
        assert (pairs / "runs" / f"hh_{stage}" / "latest" / "adapter" / "adapter_config.json").is_file(), stage
    config = yaml.safe_load((pairs / "runs" / "hh_ppo" / "latest" / "config.yaml").read_text())
    init = config["model"]["init_args"]
    assert init["sft_adapter"] == "runs/hh_sft/latest/adapter"
    assert init["reward_adapter"] == "runs/hh_reward/latest/adapter"
    assert init["reward_fn"] is None and config["data"]["init_args"]["train_file"] == "pairs.jsonl"
    capsys.readouterr()
    main(["judge", "--judge", "runs/hh_reward/latest/adapter", "--prompts", "held.jsonl", "--n", "4",
          "--system_prompt", "", "--max_new_tokens", "4", "--policy", "sft=runs/hh_sft/latest/adapter", "--policy",
          "ppo=runs/hh_ppo/latest/adapter", "--policy", "dpo=runs/hh_dpo/latest/adapter"])
    table = capsys.readouterr().out
    assert "win rate vs sft" in table and all(f"\n{p} " in table for p in ("sft", "ppo", "dpo"))
