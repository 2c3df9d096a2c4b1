"""The `lit-ft` command in process: run directories, resume of the right run, test/validate, recipes by name, W&B
settings, plain-YAML hparams, model cards (issue 22). The installed wheel itself: tests/test_install.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_ft.train import rundirs
from lit_ft.cli.app import main
from lit_ft.cli.trainer import LitFTCLI
from lit_ft.errors import ConfigError
from lit_ft.data.recipes import configs_dir, resolve_config, resolve_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_data(tmp_path):
    rows = [json.loads(x) for x in (REPO / "data/demo/sft_train.jsonl").read_text().splitlines()[:16]]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tiny_model_dir, data, *extra):
    return ["--config", "sft", "--model.init_args.base.name_or_path", tiny_model_dir, "--trainer.logger", "false",
            "--model.init_args.lora", "{r: 4, alpha: 8, dropout: 0.0}", "--data.init_args.max_length", "64",
            "--data.init_args.train_file", str(data), "--data.init_args.val_file", str(data),
            "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--model.init_args.optim.min_lr_ratio", "0.1",  # runs here are extended on resume: a floor above 0
            *extra]


def _cli(args):
    return LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    save_config_kwargs={"overwrite": True}, args=[args[0], *map(_resolve, args[1:])])


def _resolve(a):
    return resolve_config(a) if a == "sft" else a


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


# ------------------------------------------------------------------------------------------------ run directories


def test_each_fit_gets_its_own_run_and_last_resumes_the_newest_only(tiny_model_dir, small_data, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(rundirs.RUN_DIR_ENV, raising=False)
    for _ in range(2):
        main(["fit", *_args(tiny_model_dir, small_data, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                            "2")])
    root = tmp_path / "runs" / "sft"
    first, second = root / "version_0", root / "version_1"
    assert os.readlink(root / "latest") == "version_1"
    for run in (first, second):  # every output of a run is inside its directory
        assert _step(run / "checkpoints" / "last.ckpt") == 2
        assert (run / "adapter" / "adapter_config.json").exists() and (run / "config.yaml").exists()
    assert not list((root / "version_1" / "checkpoints").glob("last-v*.ckpt"))

    # `--ckpt_path last` continues the newest run in its own directory; the other run is untouched.
    main(["fit", *_args(tiny_model_dir, small_data, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"),
          "--ckpt_path", "last"])
    assert _step(second / "checkpoints" / "last.ckpt") == 4 and _step(first / "checkpoints" / "last.ckpt") == 2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0", "version_1"]

    # A checkpoint inside version_0 continues version_0 (not the newest).
    main(["fit", *_args(tiny_model_dir, small_data, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"),
          "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    assert _step(first / "checkpoints" / "last.ckpt") == 4

    # validate writes its own directory: the fit's config.yaml is never overwritten.
    config_before = (second / "config.yaml").read_text()
    main(["validate", *_args(tiny_model_dir, small_data), "--ckpt_path", "last"])
    assert (second / "config.yaml").read_text() == config_before
    assert (root / "validate_0" / "config.yaml").exists()


def test_claims_are_distinct_and_last_without_a_fit_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    runs = [rundirs.claim(tmp_path, rundirs.FIT_PREFIX) for _ in range(3)]
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    (tmp_path / "version_7").mkdir()
    assert rundirs.claim(tmp_path, rundirs.FIT_PREFIX).name == "version_8"
    assert rundirs.newest_fit(tmp_path) is None  # no run holds a checkpoint yet
    (runs[1] / "checkpoints").mkdir()
    (runs[1] / "checkpoints" / "step=2.ckpt").write_bytes(b"")
    assert rundirs.newest_fit(tmp_path) == runs[1]  # the newest run with a checkpoint, not the newest claim
    assert rundirs.finished_fit(tmp_path) is None
    rundirs.point_latest(tmp_path, runs[0])
    assert rundirs.finished_fit(tmp_path) == tmp_path / "version_0"
    with pytest.raises(ConfigError, match=r"--ckpt_path last: the newest run, .*version_1, has no checkpoints/last"):
        rundirs.last_checkpoint(runs[1], ["checkpoints"])
    assert rundirs.place("adapter", runs[0]) == str(runs[0] / "adapter")
    assert rundirs.place("/abs/adapter", runs[0]) == "/abs/adapter"
    assert rundirs.place(None, runs[0], "checkpoints") == str(runs[0] / "checkpoints")


def test_test_scores_the_test_file_as_validate_scores_the_val_file(tiny_model_dir, small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(rundirs.RUN_DIR_ENV, raising=False)
    base = _args(tiny_model_dir, small_data, "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2")
    val = _cli(["validate", *base]).trainer.callback_metrics
    test = _cli(["test", *base, "--data.init_args.test_file", str(small_data)]).trainer.callback_metrics
    assert set(test) == {"test/loss", "test/ppl"}
    assert torch.allclose(test["test/loss"], val["val/loss"]) and float(test["test/loss"]) > 0


# ------------------------------------------------------------------------------------------------ recipes and data


def test_recipes_are_named_without_a_path():
    assert resolve_config("sft") == str(configs_dir() / "sft.yaml")
    assert resolve_config("sft.yaml") == str(configs_dir() / "sft.yaml")
    assert resolve_config("strategies/fsdp") == str(configs_dir() / "strategies" / "fsdp.yaml")
    assert resolve_config("configs/ppo.yaml") == "configs/ppo.yaml" or not Path("configs/ppo.yaml").exists()
    assert resolve_config("no_such_recipe") == "no_such_recipe"  # the parser reports the missing file
    assert resolve_config("../sft") == "../sft"


def test_demo_data_is_named_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path(resolve_source("demo:sft_val.jsonl"))
    assert path.is_file() and path.read_text() == (REPO / "data/demo/sft_val.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"data.val_file: 'demo:nope.jsonl' names no demo file \(there are: "
                                          r"pref_train.jsonl, pref_val.jsonl, prompts_train.jsonl"):
        resolve_source("demo:nope.jsonl", "data.val_file")
    assert resolve_source("data/x.jsonl") == "data/x.jsonl"


def test_unknown_optimizer_flags_are_refused_and_nested_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 run=False, args=["--config", resolve_config("sft"), "--optimizer", "torch.optim.Adam"])
    assert "unrecognized arguments: --optimizer" in capsys.readouterr().err
    main(["fit", "--config", "sft", "--model.lora.help"])
    out = capsys.readouterr().out
    assert "--model.lora.r R" in out and "Rank of the update matrices." in out
    main(["fit", "--config", "sft", "--model.init_args.base.help"])
    assert "Hub revision (branch, tag or commit)" in capsys.readouterr().out


def test_plan_is_called_when_present_and_named_otherwise(capsys):
    import importlib.util

    if importlib.util.find_spec("lit_ft.plan") is not None:  # wired: `lit-ft plan ARGS` is lit_ft.plan.main(ARGS)
        try:
            main(["plan", "--help"])
        except SystemExit as e:
            assert e.code in (0, None)
        assert "usage:" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as info:
        main(["plan"])
    assert info.value.code == 2
    assert "error: `lit-ft plan` is not available in this version of lit_ft" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ W&B and hparams


def test_wandb_mode_is_obeyed(tmp_path, monkeypatch):
    import wandb

    from lit_ft.callbacks import WandbLogger

    wandb.teardown()  # an earlier test's offline run leaves W&B's process-wide settings behind
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path))
    assert not logger._offline and os.environ["WANDB_MODE"] == "disabled"  # not forced to offline
    try:
        logger.experiment.log({"a": 1})
        logger.experiment.finish()
        assert not list(tmp_path.rglob("*.wandb"))  # disabled: nothing written
    finally:
        import wandb

        wandb.teardown()  # W&B keeps its process-wide settings (the disabled mode) until torn down


def test_self_hosted_credentials_in_netrc_switch_online(tmp_path, monkeypatch):
    from lit_ft.callbacks.logging import wandb_offline

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_offline() is False
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.org")
    assert wandb_offline() is True


def test_hparams_yaml_loads_with_safe_load(tiny_model_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lit_ft import LoraSpec, ModelSpec, OptimSpec, SFTModule

    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4), optim=OptimSpec())
    logger = CSVLogger(str(tmp_path))
    logger.log_hyperparams(module.hparams_initial)
    logger.save()
    saved = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["optim"]["betas"] == [0.9, 0.999]
    assert saved["base"]["name_or_path"] == tiny_model_dir
    assert isinstance(module.base, ModelSpec) and module.lora.r == 4  # the module keeps its specs


# ------------------------------------------------------------------------------------------------ exports


def test_exports_name_the_hub_id_of_the_default_and_carry_a_model_card(tiny_model_dir, tmp_path):
    from lit_ft.models.card import DEFAULT_HUB_ID, finish_export, local_base
    from lit_ft.models import DEFAULT_MODEL_NAME, LoraSpec, ModelSpec, build_model

    model = build_model(ModelSpec(name_or_path=tiny_model_dir), LoraSpec(r=4))
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        tiny_model_dir  # what PEFT writes: this machine's directory
    finish_export(tmp_path / "a", {"name_or_path": DEFAULT_MODEL_NAME, "quantization": "nf4"})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_HUB_ID
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {DEFAULT_HUB_ID}\nlibrary_name: peft\n")
    assert "quantization while training: nf4" in card and "rank 4, alpha 32" in card

    model.save_pretrained(tmp_path / "b")  # a base the user named keeps its name
    finish_export(tmp_path / "b", {"name_or_path": tiny_model_dir})
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        tiny_model_dir
    assert local_base(tmp_path / "b") == tiny_model_dir


def test_gguf_export_says_what_is_missing(tmp_path, monkeypatch):
    from lit_ft.cli.gguf import to_gguf

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"export gguf needs (the gguf package|llama.cpp's convert_hf_to_gguf.py)"):
        to_gguf(tmp_path / "m", tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match=r"--llama_cpp: .* has no convert_hf_to_gguf.py|needs the gguf package"):
        to_gguf(tmp_path / "m", tmp_path / "m.gguf", llama_cpp=str(tmp_path))


# ------------------------------------------------------------------------------------------------ chat


def test_chat_streams_the_greedy_answer_of_base_plus_adapter(tiny_model_dir, tmp_path, capsys):
    from lit_ft.cli.chat import load
    from lit_ft.cli.chat import main as chat
    from lit_ft.models import LoraSpec, ModelSpec, build_model, load_tokenizer
    from lit_ft.stages.sft import SFTModule

    torch.manual_seed(0)
    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0))
    module.configure_model()
    with torch.no_grad():  # a non-zero update, so the adapter changes the answer
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module.save_adapter(tmp_path / "adapter", tokenizer=load_tokenizer(tiny_model_dir))
    assert oct((tmp_path / "adapter").stat().st_mode & 0o777) != oct(0o700)  # readable once exported

    chat(["--adapter", str(tmp_path / "adapter"), "--prompt", "What is 12 plus 30?", "--max_new_tokens", "6"])
    streamed = capsys.readouterr().out.strip()
    # The same answer without lit_ft's chat: the template, greedy decoding on the adapted model, decode.
    model, tok = load(str(tmp_path / "adapter"), None)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert streamed == expected and streamed
    base = build_model(ModelSpec(name_or_path=tiny_model_dir), LoraSpec(r=4)).get_base_model()
    plain = base.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not torch.equal(plain, out)  # the adapter is applied


def test_chat_takes_the_system_prompt_the_adapter_was_trained_with(tmp_path):
    """An adapter inside a run directory: chat renders the run's `data.system_prompt` (the demo's "" included);
    no config, a config without the setting, or one that is not YAML: None (the template's default)."""
    from lit_ft.cli.chat import trained_system_prompt

    run = tmp_path / "runs/sft/version_0"
    (run / "adapter").mkdir(parents=True)
    assert trained_system_prompt(str(run / "adapter")) is None
    (run / "config.yaml").write_text("data:\n  class_path: x\n  init_args:\n    system_prompt: ''\n")
    assert trained_system_prompt(str(run / "adapter")) == ""
    (run / "config.yaml").write_text("data:\n  init_args:\n    system_prompt: be brief\n")
    assert trained_system_prompt(str(run / "adapter")) == "be brief"
    (run / "config.yaml").write_text("data:\n  init_args: null\n")
    assert trained_system_prompt(str(run / "adapter")) is None
    (run / "config.yaml").write_text("data: [unclosed\n")
    assert trained_system_prompt(str(run / "adapter")) is None
    assert trained_system_prompt(None) is None


def test_load_from_checkpoint_names_no_frozen_tensor_and_loads_the_adapter(tiny_model_dir, small_data, tmp_path,
                                                                           monkeypatch, recwarn):
    from lit_ft import SFTModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(rundirs.RUN_DIR_ENV, raising=False)
    main(["fit", *_args(tiny_model_dir, small_data, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")])
    ckpt = tmp_path / "runs/sft/version_0/checkpoints/last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    recwarn.clear()
    module = SFTModule.load_from_checkpoint(ckpt, weights_only=True)
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message)]
    state = module.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    lora_key = next(iter(saved))
    with pytest.raises(RuntimeError, match=re.escape(f"does not fit: missing ['{lora_key}']")):
        module.load_state_dict({k: v for k, v in saved.items() if k != lora_key}, strict=True)
