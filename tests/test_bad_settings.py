"""Issue 14, the second bad-input sweep: settings, model and tokenizer paths, library errors, and `train.py`.

Class 1: every numeric or enum-like setting of every spec and module fails at construction with a ConfigError
naming the key, the value and the allowed range. Class 2: LoRA targets that match nothing. Class 3: max_length
above the model's context. Class 7: model and tokenizer paths. Class 9: library errors surfaced as ours.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from lit_ft.data import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.errors import ConfigError, DataError
from lit_ft.online.generation import SamplingSpec
from lit_ft.models import LoraSpec, ModelSpec, build_model, load_base, load_tokenizer
from lit_ft.train.optim import OptimSpec
from lit_ft.stages.ppo_spec import PPOSpec
from lit_ft.stages.reward import RewardModule
from lit_ft.stages.sft import SFTModule
from tests.test_bad_inputs import BAD

ROOT = Path(__file__).resolve().parents[1]
F = "x.jsonl"  # DataModules read nothing at construction
REWARD = "lit_ft.data.tasks.correctness_reward"


def _ppo(**kw):
    from lit_ft.stages.ppo import PPOModule

    return PPOModule(reward_fn=REWARD, **kw)


# (what is built, its settings, the parts the ConfigError message must hold)
SETTINGS = [
    (LoraSpec, {"alpha": 0}, "model.lora.alpha=0", "> 0"),
    (LoraSpec, {"alpha": -16}, "model.lora.alpha=-16", "> 0"),
    (LoraSpec, {"r": 0}, "model.lora.r=0", "an integer >= 1"),
    (LoraSpec, {"r": -4}, "model.lora.r=-4"),
    (LoraSpec, {"r": 2.5}, "model.lora.r=2.5", "an integer"),
    (LoraSpec, {"dropout": 1.5}, "model.lora.dropout=1.5", "[0, 1)"),
    (LoraSpec, {"dropout": 1.0}, "model.lora.dropout=1.0", "[0, 1)"),
    (LoraSpec, {"dropout": -0.1}, "model.lora.dropout=-0.1"),
    (LoraSpec, {"dropout": float("nan")}, "model.lora.dropout=nan"),
    (LoraSpec, {"target_modules": []}, "model.lora.target_modules=[]", "non-empty list"),
    (LoraSpec, {"target_modules": "q_proj"}, "model.lora.target_modules='q_proj'"),
    (LoraSpec, {"bias": "some"}, "model.lora.bias='some'", "'lora_only'"),
    (ModelSpec, {"quantization": "nf8"}, "model.base.quantization='nf8'", "'nf4'"),
    (ModelSpec, {"dtype": "fp16"}, "model.base.dtype='fp16'", "'float16'"),
    (ModelSpec, {"attn_implementation": "flash"}, "model.base.attn_implementation='flash'"),
    (OptimSpec, {"lr": -1e-4}, "model.optim.lr=-0.0001", "> 0"),
    (OptimSpec, {"lr": 0}, "model.optim.lr=0"),
    (OptimSpec, {"lr": float("inf")}, "model.optim.lr=inf"),
    (OptimSpec, {"lr": "2e-4"}, "model.optim.lr='2e-4'", "a number"),
    (OptimSpec, {"eps": 0}, "model.optim.eps=0", "> 0"),
    (OptimSpec, {"betas": (0.9, 1.0)}, "model.optim.betas=(0.9, 1.0)", "[0, 1)"),
    (OptimSpec, {"betas": (0.9,)}, "model.optim.betas=(0.9,)", "two numbers"),
    (OptimSpec, {"weight_decay": -0.01}, "model.optim.weight_decay=-0.01", ">= 0"),
    (OptimSpec, {"warmup_ratio": 1.5}, "model.optim.warmup_ratio=1.5", "[0, 1]"),
    (OptimSpec, {"warmup_steps": -1}, "model.optim.warmup_steps=-1", "or null"),
    (OptimSpec, {"min_lr_ratio": 2}, "model.optim.min_lr_ratio=2"),
    (OptimSpec, {"optimizer": "sgd"}, "model.optim.optimizer='sgd'", "'adamw'"),
    (OptimSpec, {"scheduler": "step"}, "model.optim.scheduler='step'", "'cosine'"),
    (PPOSpec, {"ppo_epochs": 0}, "model.ppo.ppo_epochs=0"),
    (PPOSpec, {"mini_batch_size": 0}, "model.ppo.mini_batch_size=0"),
    (PPOSpec, {"samples_per_prompt": 0}, "model.ppo.samples_per_prompt=0"),
    (PPOSpec, {"cliprange": 0}, "model.ppo.cliprange=0", "> 0"),
    (PPOSpec, {"gamma": 1.5}, "model.ppo.gamma=1.5", "[0, 1]"),
    (PPOSpec, {"lam": -0.1}, "model.ppo.lam=-0.1"),
    (PPOSpec, {"init_kl_coef": -0.2}, "model.ppo.init_kl_coef=-0.2", ">= 0"),
    (PPOSpec, {"target_kl": 0}, "model.ppo.target_kl=0", "> 0 or null"),
    (PPOSpec, {"ratio_threshold": 0}, "model.ppo.ratio_threshold=0", "> 0 or null"),
    (PPOSpec, {"kl_estimator": "k4"}, "model.ppo.kl_estimator='k4'", "'k3'"),
    (PPOSpec, {"rollout_correction_cap": 1.0}, "model.ppo.rollout_correction_cap=1.0: expected a number > 1"),
    (PPOSpec, {"rollout_correction": "icepop"},
     "model.ppo.rollout_correction='icepop': expected one of ['none', 'tis', 'mis']"),
    (SamplingSpec, {"temperature": 0}, "model.sampling.temperature=0", "> 0"),
    (SamplingSpec, {"top_p": 0}, "model.sampling.top_p=0", "(0, 1]"),
    (SamplingSpec, {"top_p": 1.5}, "model.sampling.top_p=1.5"),
    (SamplingSpec, {"top_k": -1}, "model.sampling.top_k=-1", ">= 0"),
    (SamplingSpec, {"max_new_tokens": 0}, "model.sampling.max_new_tokens=0"),
    (SamplingSpec, {"min_new_tokens": 65}, "model.sampling.min_new_tokens=65", "max_new_tokens=64"),
    (SFTModule, {"loss_chunk_size": 0}, "model.loss_chunk_size=0", "an integer >= 1"),
    (SFTModule, {"max_consecutive_skips": 0}, "model.max_consecutive_skips=0"),
    (RewardModule, {"center_coef": -0.01}, "model.center_coef=-0.01", ">= 0"),
    (_ppo, {"sample_table_every": -1}, "model.sample_table_every=-1", ">= 0"),
    (_ppo, {"value_model": "critic"}, "model.value_model='critic'", "'shared_trunk'"),
    (InstructionDataModule, {"train_file": F, "max_length": 0}, "data.max_length=0", "an integer >= 1"),
    (InstructionDataModule, {"train_file": F, "max_length": -512}, "data.max_length=-512"),
    (InstructionDataModule, {"train_file": F, "batch_size": 0}, "data.batch_size=0"),
    (InstructionDataModule, {"train_file": F, "eval_batch_size": 0}, "data.eval_batch_size=0", "or null"),
    (InstructionDataModule, {"train_file": F, "pad_to_multiple_of": -8}, "data.pad_to_multiple_of=-8"),
    (InstructionDataModule, {"train_file": F, "pad_to_multiple_of": 0}, "data.pad_to_multiple_of=0"),
    (InstructionDataModule, {"train_file": F, "val_split": 1.0}, "data.val_split=1.0", "[0, 1)"),
    (InstructionDataModule, {"train_file": F, "num_workers": -1}, "data.num_workers=-1"),
    (InstructionDataModule, {"train_file": F, "min_score": 0.5}, "data.min_score is set but data.score_field"),
    (InstructionDataModule, {"train_file": F, "score_field": "score"}, "data.score_field is set but data.min_score"),
    (InstructionDataModule, {"train_file": F, "score_field": "s", "min_score": float("nan")}, "data.min_score=nan"),
    (InstructionDataModule, {"train_file": F, "overlong": "cut"}, "data.overlong='cut'", "'truncate_prompt'"),
    (InstructionDataModule, {"train_file": F, "template": "chatml"}, "data.template='chatml'", "'alpaca'"),
    (InstructionDataModule, {"train_file": F, "format": "sharegpt"}, "data.format='sharegpt'", "'messages'"),
    (PreferenceDataModule, {"train_file": F, "batch_size": 0}, "data.batch_size=0"),
    (PreferenceDataModule, {"train_file": F, "format": "dpo"}, "data.format='dpo'", "'hh'"),
    (PromptDataModule, {"train_file": F, "max_length": 0}, "data.max_length=0"),
    (PromptDataModule, {"train_file": F, "num_proc": 0}, "data.num_proc=0", ">= 1 or null"),
]


def _name(case) -> str:
    build, kw, *_ = case
    settings = "-".join(f"{k}={v}" for k, v in kw.items() if k != "train_file")
    return f"{getattr(build, '__name__', 'x').strip('_')}-{settings}"


@pytest.mark.parametrize("case", SETTINGS, ids=_name)
def test_bad_setting_fails_at_construction(case):
    build, kw, *parts = case
    with pytest.raises(ConfigError) as info:
        build(**kw)
    for part in parts:
        assert part in str(info.value), str(info.value)


@pytest.mark.parametrize("build", [LoraSpec, ModelSpec, OptimSpec, PPOSpec, SamplingSpec, SFTModule, RewardModule])
def test_defaults_are_valid(build):
    build()


def test_readme_table_is_the_code_table():
    from lit_ft.validation import settings_table

    readme = (ROOT / "docs" / "data.md").read_text()
    assert settings_table() in readme, "docs/data.md's settings table is stale: python -m lit_ft.validation"


# -- class 2: LoRA targets (resolved against the loaded model's layers, lit_ft.models.families) --------------------------

TARGETS = [["q_proj", "v_prj"], ["nothing_here"], ["lm_head_typo"]]


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
def test_unmatched_lora_target_names_it(tiny_model_dir, targets):
    with pytest.raises(ConfigError) as info:
        build_model(ModelSpec(name_or_path=tiny_model_dir, dtype="float32"), LoraSpec(target_modules=targets))
    message = str(info.value)
    assert all(t in message for t in targets if t != "q_proj"), message  # the names that match nothing ...
    assert "down_proj" in message, message  # ... and the model's linear layers to choose from


PEFT_CASES = [
    ({"modules_to_save": ["scroe"]}, ("model.lora.modules_to_save: ['scroe'] name no module", "lm_head")),
    ({"modules_to_save": ["lm_head", "embed"]}, ("['embed']",)),
    ({"target_modules": ["nothing_here"]}, ("model.lora.target_modules: 'nothing_here' matches no layer", "q_proj")),
]


@pytest.mark.parametrize("kw,parts", PEFT_CASES, ids=["modules_to_save", "modules_to_save_partial", "targets"])
def test_peft_refusals_name_the_setting(tiny_model_dir, kw, parts):
    with pytest.raises(ConfigError) as info:
        build_model(ModelSpec(name_or_path=tiny_model_dir, dtype="float32"), LoraSpec(**kw))
    assert all(p in str(info.value) for p in parts), str(info.value)


# -- class 3: longer than the model can read ---------------------------------------------------------------------

@pytest.mark.parametrize("module", [InstructionDataModule, PromptDataModule, PreferenceDataModule])
def test_max_length_above_the_context_is_clamped_and_said(module, tiny_model_dir, caplog):
    files = {InstructionDataModule: "bom.jsonl", PromptDataModule: "empty_prompt.jsonl",
             PreferenceDataModule: "chosen_equals_rejected.jsonl"}
    dm = module(train_file=str(BAD / files[module]), tokenizer=tiny_model_dir, val_split=0.0, max_length=1000)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.max_length == 256  # the tiny model's max_position_embeddings
    assert any("data.max_length=1000" in r.getMessage() and "max_position_embeddings=256" in r.getMessage()
               for r in caplog.records)


def test_max_length_within_the_context_is_kept(tiny_model_dir):
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=tiny_model_dir, val_split=0.0,
                               max_length=256)
    dm.setup("fit")
    assert dm.max_length == 256


# -- class 7 and 9: model and tokenizer paths, templates ---------------------------------------------------------

@pytest.fixture
def variant(tiny_model_dir, tmp_path):
    """A copy of the tiny model directory, to break in one way."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def test_half_written_tokenizer_json(variant):
    data = (variant / "tokenizer.json").read_bytes()
    (variant / "tokenizer.json").write_bytes(data[: len(data) // 2])
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=str(variant))
    with pytest.raises(ConfigError, match=r"^model.base.name_or_path \(data.tokenizer\): cannot load a tokenizer "
                                          r"from '.*model': \w+(Error|Exception): .*line \d+") as info:
        dm.setup("fit")
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


def test_tokenizer_json_of_random_bytes(variant):
    (variant / "tokenizer.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(str(variant))


def test_model_directory_without_weights(variant):
    (variant / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.base.name_or_path: .*model has no weights"):
        load_base(ModelSpec(name_or_path=str(variant)))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf", bytes(range(256))], ids=["empty", "zip", "bytes"])
def test_random_bytes_gguf(tmp_path, content):
    f = tmp_path / "model.gguf"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=r"model.base.name_or_path: .*model.gguf is not a GGUF file"):
        load_base(ModelSpec(name_or_path=str(f)))
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=str(f))
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        dm.setup("fit")


TEMPLATES = {
    "syntax": ("{% for message in messages %}{{ message['content'] }", "TemplateSyntaxError"),
    "unknown_filter": ("{{ messages | shout }}", "TemplateAssertionError"),
    "undefined": ("{{ messages[0]['content'].nope.deeper }}", "UndefinedError"),
    "leaves_content_out": ("{% for m in messages[0]['content'].nope %}{{ m }}{% endfor %}", "leaves the messages out"),
}


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_broken_chat_template_is_one_config_error(variant, kind):
    template, error = TEMPLATES[kind]
    (variant / "chat_template.jinja").write_text(template)
    dm = InstructionDataModule(train_file=str(BAD / "bom.jsonl"), tokenizer=str(variant))
    with pytest.raises(ConfigError, match=rf"data.template='chat': the chat template of .*model .*{error}") as info:
        dm.setup("fit")
    assert kind == "leaves_content_out" or info.value.__cause__ is not None  # the engine's error is chained


def test_chat_template_refusing_a_row_names_the_row(variant, tmp_path):
    (variant / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'forbidden' %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"instruction": "ok", "output": "fine"}) + "\n"
                 + json.dumps({"instruction": "forbidden", "output": "x"}) + "\n")
    dm = InstructionDataModule(train_file=str(f), tokenizer=str(variant), val_split=0.0)
    with pytest.raises(DataError, match=r"rows.jsonl:2: the chat template refused this row: .*no forbidden words"):
        dm.setup("fit")


def test_bitsandbytes_optimizer_named_by_setting_when_missing(monkeypatch):
    """An optimizer setting whose library is absent: one line naming the setting."""
    import sys

    import torch

    from lit_ft.train.optim import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it gives
    params = [("w", torch.nn.Parameter(torch.zeros(2, 2)))]
    with pytest.raises(ConfigError, match=r"model.optim.optimizer='paged_adamw_8bit' needs bitsandbytes"):
        make_optimizer(params, OptimSpec(optimizer="paged_adamw_8bit"))


# -- train.py: a lit_ft error is one line ------------------------------------------------------------------------

CLI_CASES = [
    (["--model.init_args.lora.alpha", "0"], "error: model.lora.alpha=0: expected a number > 0"),
    (["--data.init_args.batch_size", "0"], "error: data.batch_size=0: expected an integer >= 1"),
    (["--data.init_args.train_file", str(BAD / "invalid_json_line3.jsonl")],
     "invalid_json_line3.jsonl:3: invalid JSON"),
]


@pytest.mark.parametrize("args,line", CLI_CASES, ids=["setting", "data-setting", "data-row"])
def test_train_py_prints_one_line(args, line, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lit_ft.cli.app import main

    monkeypatch.chdir(ROOT)
    argv = ["fit", "--config", "configs/sft.yaml", "--model.init_args.base.name_or_path", tiny_model_dir,
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "false", *args]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and line in lines[0], err
    assert "Traceback" not in err and not re.search(r'File ".*", line \d+', err), err
