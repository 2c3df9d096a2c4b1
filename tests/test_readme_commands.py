"""The README's command lines, as written there, on a tiny model (issue 22: "every README command is exercised by a
test or a script CI runs"). `test_every_readme_command_is_exercised` lists each command line of the README with the
test that runs it, so a new command in the README without a test fails here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_ft.train import rundirs
from lit_ft.cli.app import main

REPO = Path(__file__).resolve().parents[1]

# A README command (its start, as a regular expression) -> the tests that run it ("file.py::name"), or why none can.
EXERCISED = {
    r"lit-ft demo": "tests/test_demo.py (the demo on a tiny model, with demo.py)",
    r"lit-ft fit --config sft$": "test_install.py::test_fit_predict_export_from_an_empty_directory",
    r"lit-ft fit --config (sft_qlora|reward|ppo|dpo|kto|grpo|distill)$": "test_configs.py::test_config_instantiates",
    r"lit-ft fit --config (sft|reward|ppo|grpo|dpo) --config recipes/hh_rlhf/": "test_rlhf_recipe.py::test_the_readme_"
                                                                          "pipeline_runs_on_one_file_of_pairs",
    r"lit-ft fit --config sft --trainer.fast_dev_run": "test_hostile.py::test_every_recipe_has_a_smoke_run",
    r"lit-ft fit --config sft --ckpt_path last": "test_tool.py::test_each_fit_gets_its_own_run_and_last_resumes_the_"
                                                 "newest_only",
    r"lit-ft (predict|test) --config sft --ckpt_path last": "test_readme_commands.py::test_quick_start_commands",
    r"lit-ft chat --adapter": "test_readme_commands.py::test_quick_start_commands",
    r"lit-ft export (merge|adapter|gguf)(?!.*--push-to-hub)": "test_readme_commands.py::test_quick_start_commands",
    r"lit-ft export merge .*--push-to-hub": "test_export_hub.py::test_offline_push_is_refused_in_one_line_before_"
                                            "exporting (no test reaches the network)",
    r"lit-ft --help": "test_install.py::test_help_lists_commands_and_recipes_and_plan_is_wired",
    r"lit-ft fit (--config (sft|ppo) )?--(model|data)[.\w]*\.help|lit-ft fit --help|lit-ft fit --config sft "
    r"--print_config": "test_readme_commands.py::test_help_and_print_config",
    r"lit-ft fit --config sft --config strategies/": "test_configs.py (each strategy composed with sft); "
                                                     "test_ddp.py, test_strategies_gpu.py run them",
    r"python -m lit_ft( \.\.\.|$)|python train\.py": "test_install.py (python -m lit_ft --help), "
                                                     "test_checkpoint_safety.py (train.py fit)",
    r"python -m lit_ft\.data\.tasks": "test_readme_commands.py::test_tasks_regenerates_the_demo_data",
    r"python -m lit_ft\.validation": "test_bad_settings.py (the README table equals the code's)",
    r"lit-ft plan": "test_plan.py::test_cli_reads_the_config_as_fit_and_advises",
    r"lit-ft fit .*--memory": "test_memory_auto.py::test_the_chosen_settings_reach_the_run",
    r"lit-ft judge --judge": "test_judge.py::test_the_command_scores_each_answer_as_the_reward_scorer_does",
    r"make test": "CI (.ci/run runs exactly `make test`)",
    r"make demo": "the targets run `lit-ft demo` / `lit-ft fit --config <stage>` (tests/test_demo.py, test_configs.py)",
    r"wandb sync": "needs the network; the offline run directory it names: test_wandb_artifacts.py",
    r"lit-ft( \w+)?$": "the name of a command, in the text (its command lines are above)",
    r"torchrun ": "several machines: not on CI (CPU DDP through Lightning: test_ddp.py)",
}


def readme_commands() -> list[str]:
    """Every `lit-ft ...`, `make ...`, `python -m lit_ft...`, `python train.py`, `wandb sync` and `torchrun` command
    of the README and the pages of docs/: lines of their shell blocks and inline code spans."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += [line.split("  #")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`((?:lit-ft|make|python -m lit_ft|python train\.py|wandb sync|torchrun)[^`]*)`", text)
    starts = ("lit-ft", "make ", "python -m lit_ft", "python train.py", "wandb sync", "torchrun", "$ python -m")
    return sorted({c.removeprefix("$ ").rstrip(" \\") for c in found if c.startswith(starts)})


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) > 30, commands
    missing = [c for c in commands if not any(re.match(p, c) for p in EXERCISED)]
    assert not missing, f"README commands no test runs (add a test and an EXERCISED entry): {missing}"
    for where in EXERCISED.values():  # the named tests exist
        for file, name in re.findall(r"(test_\w+\.py)::(\w+)", where):
            assert f"def {name}(" in (REPO / "tests" / file).read_text(), (file, name)


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path, monkeypatch):
    """A finished 2-step fit of the `sft` recipe on the tiny model in runs/sft/version_0 (the cwd is tmp_path), and
    the overrides that swap the tiny model and data in (the README's short keys, without init_args)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(rundirs.RUN_DIR_ENV, raising=False)
    rows = [json.loads(x) for x in (REPO / "data/demo/sft_train.jsonl").read_text().splitlines()[:16]]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--model.base.name_or_path", tiny_model_dir, "--trainer.logger", "false",
             "--model.lora", "{r: 4, alpha: 8, dropout: 0.0}", "--data.max_length", "64",
             "--data.train_file", "test.jsonl", "--data.val_file", "test.jsonl", "--data.batch_size", "4",
             "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]
    main(["fit", "--config", "sft", *small, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert (tmp_path / "runs/sft/latest/adapter/adapter_config.json").exists()
    return small


def test_quick_start_commands(tiny_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    small = tiny_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n"
                               for a in range(3)))
    # lit-ft predict --config sft --ckpt_path last --data.predict_file prompts.jsonl
    main(["predict", "--config", "sft", *small, "--ckpt_path", "last", "--data.predict_file", "prompts.jsonl"])
    rows = [json.loads(x) for x in (tmp_path / "runs/sft/predict_0/predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["2", "3", "4"]

    # lit-ft test --config sft --ckpt_path last --data.test_file test.jsonl: the validation loss of the same rows
    main(["test", "--config", "sft", *small, "--ckpt_path", "last", "--data.test_file", "test.jsonl",
          "--trainer.limit_test_batches", "1"])
    assert (tmp_path / "runs/sft/test_0/config.yaml").exists()

    # lit-ft chat --adapter runs/sft/latest/adapter --prompt "What is 12 + 30?"
    capsys.readouterr()
    main(["chat", "--adapter", "runs/sft/latest/adapter", "--prompt", "What is 12 + 30?", "--max_new_tokens", "4"])
    assert capsys.readouterr().out.strip()

    # lit-ft export adapter --ckpt runs/sft/latest/checkpoints/last.ckpt --out sft_adapter_from_ckpt
    main(["export", "adapter", "--ckpt", "runs/sft/latest/checkpoints/last.ckpt", "--out", "sft_adapter_from_ckpt"])
    assert (tmp_path / "sft_adapter_from_ckpt/adapter_model.safetensors").exists()

    # lit-ft export merge --adapter runs/sft/latest/adapter --out sft_merged (python -m lit_ft.cli.export merge
    # --attn-implementation auto is the same): the merged model's logits are base + adapter's.
    main(["export", "merge", "--adapter", "runs/sft/latest/adapter", "--out", "sft_merged",
          "--attn-implementation", "auto"])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        str(tmp_path / "runs/sft/latest/adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    # lit-ft export gguf --src sft_merged --out sft.gguf --llama_cpp DIR: without llama.cpp's converter there, one
    # line naming what is missing, exit 2.
    (tmp_path / "llama.cpp").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["export", "gguf", "--src", "sft_merged", "--out", "sft.gguf", "--llama_cpp", "llama.cpp"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    missing = r"export gguf needs the gguf package.*|--llama_cpp: .* has no convert_hf_to_gguf\.py.*"
    assert re.fullmatch(f"error: ({missing})", err), err


def test_help_and_print_config(capsys):
    def shown(*argv) -> str:
        capsys.readouterr()
        try:
            main(list(argv))
        except SystemExit as e:
            assert e.code in (0, None), argv
        return capsys.readouterr().out

    assert "--model.loss_chunk_size" in shown("fit", "--model.help", "lit_ft.stages.sft.SFTModule")
    assert "--data.max_length" in shown("fit", "--data.help", "lit_ft.data.modules.InstructionDataModule")
    assert "--trainer.max_steps" in shown("fit", "--help")
    assert "--model.base.name_or_path" in shown("fit", "--config", "sft", "--model.base.help")
    assert "--model.optim.lr" in shown("fit", "--config", "sft", "--model.optim.help")
    assert "--model.ppo.cliprange" in shown("fit", "--config", "ppo", "--model.ppo.help")
    config = yaml.safe_load(shown("fit", "--config", "sft", "--print_config"))
    assert config["model"]["class_path"] == "lit_ft.SFTModule"
    recipe = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())  # the resolved config keeps the recipe's values
    assert config["trainer"]["max_steps"] == recipe["trainer"]["max_steps"]
    assert config["model"]["init_args"]["lora"]["r"] == recipe["model"]["init_args"]["lora"]["r"] == 16


def test_tasks_regenerates_the_demo_data(tmp_path):
    subprocess.run([sys.executable, "-m", "lit_ft.data.tasks", str(tmp_path)], cwd=REPO, check=True, timeout=120)
    made = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert made == sorted(p.name for p in (REPO / "data/demo").glob("*.jsonl"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (REPO / "data/demo" / name).read_bytes(), name
