"""Hostile and careless inputs, one test per class, through the real entry points (`lit-ft ...` in process):
nothing a shared file can run, nothing a command destroys, no run that silently trains nothing, and one `error:`
line with exit 2 for every user error."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from lit_ft import SFTModule
from lit_ft.cli.app import main
from lit_ft.train import integrity

FIXTURES = Path(__file__).parent / "fixtures" / "premove"
BASE = str(FIXTURES / "base")
ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(4) for b in range(4)]


def one_error_line(capsys, argv: list[str], *expected: str) -> str:
    """Run `lit-ft argv`: exit 2 and exactly one `error:` line holding every `expected` text, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err and not re.search(r'File ".*", line \d+', err), err[-2000:]
    return lines[0]


@pytest.fixture
def sft_file(tmp_path) -> str:
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(f)


def fit_args(data_file: str, root: Path, *extra: str, module: str = "lit_ft.SFTModule",
             data: str = "lit_ft.InstructionDataModule") -> list[str]:
    return ["fit", "--model", module, "--model.base.name_or_path", BASE, "--model.lora.r", "4",
            "--model.lora.alpha", "8", "--data", data, "--data.train_file", data_file, "--data.val_split", "0",
            "--data.max_length", "48", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(root), *extra]


def _doctored(src: Path, dst: Path, **hparams) -> Path:
    """A copy of a lit_ft checkpoint whose stored settings say something else, sealed again (a digest proves the
    file is whole, not that its author meant well)."""
    state = torch.load(src, weights_only=True)
    for key, value in hparams.items():
        state["hyper_parameters"][key] = value
    integrity.seal(state)
    torch.save(state, dst)
    return dst


class Payload:
    """Any pickled object that is not a tensor or a plain value: unpickling it would run code."""

    def __reduce__(self):
        return (os.getcwd, ())


# ---------------------------------------------------------------------------------------------- security


def test_a_checkpoint_never_overrides_what_the_user_typed(sft_file, tmp_path):
    base = dict(torch.load(FIXTURES / "sft.ckpt", weights_only=True)["hyper_parameters"]["base"])
    evil = _doctored(FIXTURES / "sft.ckpt", tmp_path / "evil.ckpt", _class_path="lit_ft.RewardModule",
                     base=dict(base, name_or_path=str(tmp_path / "someone_elses_model"), trust_remote_code=True))
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", "--ckpt_path", str(evil)))
    config = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "class_path: lit_ft.SFTModule" in config and "trust_remote_code: false" in config
    assert f"name_or_path: {BASE}" in config and "someone_elses_model" not in config
    last = torch.load(next((tmp_path / "runs").rglob("*.ckpt")), weights_only=True)
    assert last["global_step"] == 4 and last["hyper_parameters"]["base"]["trust_remote_code"] is False


def test_a_checkpoint_of_another_module_class_is_refused(sft_file, tmp_path, capsys):
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", "--ckpt_path",
                                    str(FIXTURES / "reward.ckpt")),
                   "written by RewardModule, not SFTModule")


def test_a_pickled_checkpoint_is_a_one_line_refusal(sft_file, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "2", "--ckpt_path",
                                    str(evil)), "evil.ckpt: refused: the file holds pickled Python objects")
    one_error_line(capsys, ["export", "adapter", "--ckpt", str(evil), "--out", str(tmp_path / "out")],
                   "evil.ckpt: refused")
    assert not (tmp_path / "out").exists()


def test_a_pickled_adapter_is_a_one_line_refusal(sft_file, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "sft_adapter", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x": Payload()}, adapter / "adapter_model.bin")
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1",
                                    "--model.base.adapter", str(adapter)),
                   "model.base.adapter", "adapter_model.bin: refused: the file holds pickled Python objects")


def test_a_chat_template_that_never_ends_is_refused_in_time(sft_file, tmp_path, capsys, monkeypatch):
    from lit_ft.data import templates

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "base", tokenizer)
    (tokenizer / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}")
    monkeypatch.setattr(templates, "RENDER_SECONDS", 1.0)
    argv = fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", "--data.template", "chat")
    argv[argv.index(BASE)] = str(tokenizer)  # a model whose tokenizer ships the template
    one_error_line(capsys, argv, "data.template='chat'", "took longer than 1 s")


# ---------------------------------------------------------------------------------------------- outputs


def test_exports_never_destroy_what_is_there(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "sft_adapter", adapter)
    before = sorted(p.name for p in adapter.iterdir())
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    merge = ["export", "merge", "--adapter", str(adapter), "--base", BASE, "--out"]
    one_error_line(capsys, [*merge, str(kept)], "already exists and is not empty", "--overwrite")
    one_error_line(capsys, [*merge, str(adapter)], "is (or holds, or lies inside) the input")
    one_error_line(capsys, [*merge, str(adapter / "merged")], "the input")
    one_error_line(capsys, [*merge, str(a_file)], "an existing file, not a directory")
    one_error_line(capsys, ["export", "merge", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "m")],
                   "--adapter", "no adapter_config.json")
    assert (kept / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine"
    assert sorted(p.name for p in adapter.iterdir()) == before
    main([*merge, str(kept), "--overwrite"])  # said explicitly: replaced
    assert (kept / "config.json").is_file() and not (kept / "notes.txt").exists()


# ---------------------------------------------------------------------------------------------- runs that train nothing


def test_a_verifiable_reward_without_usable_answers_is_refused_before_the_first_step(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?", "solution": str(a + 1)}) + "\n"
                               for a in range(8)))
    argv = ["fit", "--model", "lit_ft.GRPOModule", "--model.base.name_or_path", BASE, "--model.lora.r", "4",
            "--model.reward_fn", "lit_ft.data.tasks.correctness_reward", "--model.sampling.max_new_tokens", "4",
            "--model.grpo.samples_per_prompt", "2", "--data", "lit_ft.PromptDataModule",
            "--data.train_file", str(prompts), "--data.val_split", "0", "--data.batch_size", "4",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "runs")]
    one_error_line(capsys, argv, "model.reward_fn=lit_ft.data.tasks.correctness_reward",
                   "data.answer_field='answer'", "none of the 8 training rows")


@pytest.mark.parametrize("answer,response,match", [("11", "so 11.0", True), ("11.0", "it is 11", True),
                                                   (11, "11", True), ("1,200", "1200 apples", True),
                                                   ("12", "11", False), ("", "11", False)])
def test_numbers_match_however_they_are_written(answer, response, match):
    from lit_ft.data.tasks import correctness_reward, exact_match

    assert exact_match(response, answer) is match
    assert correctness_reward(["p"], [response], [answer]) == [float(match)]


def test_zero_steps_or_no_accumulation_is_refused(sft_file, tmp_path, capsys):
    one_error_line(capsys, fit_args(sft_file, tmp_path / "a", "--trainer.max_steps", "0"), "trainer.max_steps=0")
    one_error_line(capsys, fit_args(sft_file, tmp_path / "b", "--trainer.max_steps", "2",
                                    "--trainer.accumulate_grad_batches", "0"), "trainer.accumulate_grad_batches=0")


def test_extending_a_finished_schedule_is_refused(sft_file, tmp_path, capsys):
    first = tmp_path / "runs"
    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath=checkpoints", "--trainer.callbacks.save_last=true"]
    main(fit_args(sft_file, first, "--trainer.max_steps", "2", *ckpt))
    one_error_line(capsys, fit_args(sft_file, first, "--trainer.max_steps", "6", *ckpt, "--ckpt_path", "last"),
                   "trainer.max_steps", "had already reached 0 at step 2")


class InfiniteLossSFT(SFTModule):
    """Every loss infinite, as a margin or scale that overflows makes it: every optimizer step is skipped."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("inf")


def test_a_run_whose_every_step_was_skipped_fails_and_exports_nothing(sft_file, tmp_path, capsys):
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", "--trainer.callbacks+=lit_ft.ExportAdapter"))
    assert os.readlink(tmp_path / "runs" / "latest") == "version_0"
    argv = fit_args(sft_file, tmp_path / "runs", "--trainer.max_epochs", "1",  # 4 batches: fewer than 10 in a row
                    "--trainer.callbacks+=lit_ft.ExportAdapter", module="tests.test_hostile.InfiniteLossSFT")
    one_error_line(capsys, argv, "every optimizer step of this run was skipped")
    assert not list((tmp_path / "runs" / "version_1").rglob("adapter_config.json"))
    assert os.readlink(tmp_path / "runs" / "latest") == "version_0"  # the next stage still finds a trained adapter


# ---------------------------------------------------------------------------------------------- one line, exit 2


def test_the_shipped_recipe_runs_on_a_small_file(sft_file, tmp_path):
    """configs/sft.yaml validates every 30 steps; a 16-row file has 2 batches an epoch (Lightning alone refuses a
    val_check_interval longer than an epoch)."""
    root = Path(__file__).parents[1]
    main(["fit", "--config", str(root / "configs" / "sft.yaml"), "--model.base.name_or_path", BASE,
          "--data.train_file", sft_file, "--data.val_file", sft_file, "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "3", "--trainer.logger", "false", "--trainer.callbacks", "[]",
          "--trainer.default_root_dir", str(tmp_path / "runs")])


def test_lora_on_the_lm_head_of_sft_is_a_one_line_error(sft_file, tmp_path, capsys):
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1",
                                    "--model.lora.target_modules", "[lm_head]"),
                   "model.lora.target_modules: the LM head is adapted", "would never train")


def test_a_root_directory_under_a_file_is_a_one_line_error(sft_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_error_line(capsys, fit_args(sft_file, blocker / "runs", "--trainer.max_steps", "1"), str(blocker))


# ---------------------------------------------------------------------------------------------- the first hour


def test_every_recipe_has_a_smoke_run(tmp_path, monkeypatch):
    """`--trainer.fast_dev_run 2` (README, "Smoke run"): two steps of each shipped stage on the tiny model, held-out
    evaluations off, chained as the demo chains them (the SFT adapter starts DPO/KTO/GRPO/PPO, the reward adapter
    scores PPO)."""
    monkeypatch.chdir(tmp_path)
    smoke = ["--model.base.name_or_path", BASE, "--trainer.fast_dev_run", "2", "--trainer.logger", "false"]
    main(["fit", "--config", "sft", *smoke])
    main(["fit", "--config", "reward", *smoke])
    sft, reward = tmp_path / "runs/sft/latest/adapter", tmp_path / "runs/reward/latest/adapter"
    assert (sft / "adapter_config.json").is_file() and (reward / "adapter_config.json").is_file()
    main(["fit", "--config", "dpo", *smoke, "--model.sft_adapter", str(sft)])
    main(["fit", "--config", "kto", *smoke, "--model.sft_adapter", str(sft)])
    main(["fit", "--config", "grpo", *smoke, "--model.sft_adapter", str(sft), "--model.sampling.max_new_tokens", "8"])
    main(["fit", "--config", "ppo", *smoke, "--model.sft_adapter", str(sft), "--model.reward_adapter", str(reward),
          "--model.sampling.max_new_tokens", "8"])
    for stage in ("dpo", "kto", "grpo", "ppo"):
        assert (tmp_path / f"runs/{stage}/latest/adapter/adapter_config.json").is_file(), stage


def test_a_reward_batch_in_another_format_names_the_expected_one():
    from lit_ft import ConfigError, LoraSpec, ModelSpec, RewardModule

    module = RewardModule(ModelSpec(name_or_path=BASE), LoraSpec(r=4))
    trl_style = {"input_ids_chosen": torch.ones(2, 3, dtype=torch.long),
                 "input_ids_rejected": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ConfigError, match=r"a batch is a dict with input_ids Long\[2B, T\].*got \['input_ids_chosen'"):
        module.rewards(trl_style)


CKPT_EVERY_2 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.dirpath=checkpoints", "--trainer.callbacks.save_last=true",
                "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
                "--model.optim.min_lr_ratio", "0.1"]  # a schedule that a longer run can still extend


def test_a_moved_run_folder_resumes_into_its_own_last_checkpoint(sft_file, tmp_path):
    main(fit_args(sft_file, tmp_path / "before", "--trainer.max_steps", "2", *CKPT_EVERY_2))
    shutil.move(tmp_path / "before", tmp_path / "after")
    main(fit_args(sft_file, tmp_path / "after", "--trainer.max_steps", "4", *CKPT_EVERY_2, "--ckpt_path", "last"))
    folder = next((tmp_path / "after").rglob("last.ckpt")).parent
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]  # no stale last.ckpt beside last-v1
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4


def test_last_resumes_the_newest_run_with_a_checkpoint_not_a_newer_failed_start(sft_file, tmp_path, capsys):
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "2", *CKPT_EVERY_2))
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.accumulate_grad_batches", "0"),
                   "trainer.accumulate_grad_batches")  # refused before it trained: it leaves no run directory
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "version_0"]
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false"))
    gc.collect()  # its Trainer gone: only the command's end protects the run now
    assert not any((tmp_path / "runs" / "version_1").rglob("*.ckpt"))  # a newer run without a checkpoint
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", *CKPT_EVERY_2, "--ckpt_path", "last"))
    last = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert os.readlink(tmp_path / "runs" / "latest") == "version_0"


def test_a_refused_new_run_leaves_no_run_directory(sft_file, tmp_path, capsys):
    """Refused at its data after the logger had opened its files, or at `--ckpt_path last` right after claiming its
    directory: no `version_N/` or `validate_N/` is left behind; a finished run is never a later command's to remove.
    Unit: a run directory that holds a checkpoint, or whose run trained a step, is never removed."""
    from lit_ft.train import rundirs

    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "."]
    one_error_line(capsys, fit_args(str(tmp_path / "missing.jsonl"), tmp_path / "runs", *csv), "file not found")
    assert list((tmp_path / "runs").iterdir()) == []
    validate = ["validate", *fit_args(sft_file, tmp_path / "runs")[1:], "--ckpt_path", "last"]
    one_error_line(capsys, validate, "--ckpt_path last: no fit run")  # refused right after claiming validate_0/
    assert list((tmp_path / "runs").iterdir()) == []
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false"))
    gc.collect()  # its Trainer gone: only the command's end protects the run now
    one_error_line(capsys, ["export", "adapter", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")],
                   "nope.ckpt")  # a finished run is not the next command's to remove (refused before it claims one)
    assert (tmp_path / "runs" / "version_0").is_dir()
    kept = tmp_path / "kept"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert not rundirs.discard_unused(kept, trained=False) and kept.is_dir()
    (kept / "checkpoints" / "last.ckpt").unlink()
    assert not rundirs.discard_unused(kept, trained=True) and kept.is_dir()
    assert rundirs.discard_unused(kept, trained=False) and not kept.exists()


def test_a_deleted_last_checkpoint_resumes_from_the_newest_good_one(sft_file, tmp_path, capsys):
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", *CKPT_EVERY_2))
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    last.unlink()
    capsys.readouterr()
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "6", *CKPT_EVERY_2, "--ckpt_path", "last"))
    assert re.search(r"has no last.ckpt; resuming from epoch=\d+-step=4.ckpt", capsys.readouterr().err)
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_predict_without_its_file_stops_before_making_anything(sft_file, tmp_path, capsys):
    argv = ["predict", "--model", "lit_ft.SFTModule", "--model.base.name_or_path", BASE, "--data",
            "lit_ft.InstructionDataModule", "--data.train_file", sft_file, "--trainer.default_root_dir",
            str(tmp_path / "runs")]
    one_error_line(capsys, argv, "data.predict_file")
    assert not (tmp_path / "runs").exists()


def test_loraplus_trains_the_b_matrices_at_a_multiple_of_the_lr_and_keeps_it_on_resume(sft_file, tmp_path):
    """LoRA+ (Hayou et al. 2024): `model.optim.loraplus_lr_ratio` puts every lora_B at lr x ratio, and a resumed run
    (Lightning restores the param groups, the resume rule sets this run's lr) keeps the ratio."""
    from lit_ft import LoraSpec, ModelSpec, OptimSpec, SFTModule
    from lit_ft.train.optim import make_optimizer

    module = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4),
                       optim=OptimSpec(lr=1e-3, loraplus_lr_ratio=16))
    module.configure_model()
    opt = make_optimizer(module.named_parameters(), module.optim)
    names = {id(p): n for n, p in module.named_parameters()}
    assert {g["lr"] for g in opt.param_groups} == {1e-3, 1e-3 * 16}
    assert all("lora_B" in names[id(p)] for g in opt.param_groups if g["lr"] == 1e-3 * 16 for p in g["params"])
    assert all("lora_B" not in names[id(p)] for g in opt.param_groups if g["lr"] == 1e-3 for p in g["params"])
    extra = ["--model.optim.loraplus_lr_ratio", "16", "--model.optim.scheduler", "constant",
             "--model.optim.warmup_ratio", "0", *CKPT_EVERY_2]
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "2", *extra))
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", *extra, "--ckpt_path", "last"))
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    lrs = sorted({g["lr"] for g in state["optimizer_states"][0]["param_groups"]})
    assert state["global_step"] == 4 and lrs == [2e-4, 16 * 2e-4]  # the recipe-less default lr, and 16 x it


@pytest.mark.parametrize("command", [["export", "merge", "--adapter", "{adapter}", "--out", "{file}"],
                                     ["export", "adapter", "--ckpt", "{file}", "--out", "{file}"],
                                     ["export", "gguf", "--src", "{adapter}", "--out", "{adapter}"],
                                     ["--help"]])
def test_a_refused_output_path_and_help_come_before_torch_is_imported(tmp_path, command):
    """The light commands and every export's check of its output path run without importing torch (seconds)."""
    import subprocess
    import sys

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    argv = [a.format(adapter=tmp_path / "adapter", file=tmp_path / "a_file") for a in command]
    code = ("import sys\nfrom lit_ft.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\nprint('torch' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["False", "0" if command == ["--help"] else "2"], done.stdout + done.stderr
    if command != ["--help"]:
        assert re.search(r"^error: --(out|src|ckpt) ", done.stderr, re.M), done.stderr


def test_saving_an_adapter_asks_no_hub_and_warns_nothing(tmp_path, monkeypatch):
    """PEFT's save looks up the base's config.json on the Hub to see whether the vocabulary was resized (a network
    call, and under no network the line "Could not find a config file"); lit_ft never resizes embeddings, so it
    tells PEFT not to look."""
    import warnings

    import peft.utils.save_and_load as peft_save

    from lit_ft import LoraSpec, ModelSpec

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    module = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4))
    module.configure_model()
    module.model.peft_config["default"].base_model_name_or_path = "someone/not-cached-here"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not [w for w in seen if "config" in str(w.message)], [str(w.message) for w in seen]
