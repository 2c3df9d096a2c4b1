"""Every YAML in configs/ parses and instantiates through the CLI; overrides and links work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_ft.cli.trainer import LitFTCLI

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml"))
OVERLAYS = [c for c in CONFIGS if "/recipes/hh_rlhf/" in c]  # compose with a stage's recipe: `--config ppo --config X`
STAGES = [c for c in CONFIGS if "/strategies/" not in c and c not in OVERLAYS]


def _cli(args):
    import lightning as L

    return LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=args, save_config_callback=None)


@pytest.mark.parametrize("config", STAGES, ids=[Path(c).stem for c in STAGES])
def test_config_instantiates(config, tmp_path):
    cli = _cli(["--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert cli.model.__class__.__module__.startswith("lit_ft.")
    assert cli.datamodule.__class__.__module__.startswith("lit_ft.data")
    assert cli.model.model is None, "models are built in configure_model(), not at construction"


def test_overrides_and_model_name_link(tmp_path):
    cli = _cli([
        "--config", "configs/sft.yaml", "--trainer.logger", "false",
        "--model.lora.r", "32", "--data.max_length", "512", "--trainer.precision", "bf16-mixed",
        "--model.base.name_or_path", "some/model",
    ])
    assert cli.model.lora.r == 32
    assert cli.datamodule.max_length == 512
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.datamodule.tokenizer_name == "some/model"


STRATEGIES = [c for c in CONFIGS if "/strategies/" in c]


class _StrategyOnlyCLI(LitFTCLI):
    """Parses and instantiates everything but the Trainer (Lightning's FSDP refuses a CPU accelerator)."""

    def instantiate_trainer(self, **kwargs):
        return self.config_init["trainer"]


@pytest.mark.parametrize("config", STRATEGIES, ids=[Path(c).stem for c in STRATEGIES])
def test_strategy_config_composes_with_a_stage(config, tmp_path):
    import importlib.util

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from lit_ft.train.resume import AtomicCheckpointIO
    from lit_ft.train.strategies import wrap_decoder_layers

    if "deepspeed" in config and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    args = ["--config", "configs/sft.yaml", "--config", config, "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    if "ddp" in config:  # DDP instantiates on the CPU: the whole Trainer
        cli = _cli(args + ["--trainer.accelerator", "cpu"])
        strategy = cli.trainer.strategy
        assert isinstance(strategy, DDPStrategy)
        assert strategy._ddp_kwargs["find_unused_parameters"] is False
        assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
    else:
        cli = _StrategyOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                               subclass_mode_data=True, run=False, args=args, save_config_callback=None)
        strategy = cli.trainer.strategy
        if "fsdp" in config:
            assert isinstance(strategy, FSDPStrategy)
            assert strategy.kwargs["use_orig_params"] is True
            assert strategy.kwargs["auto_wrap_policy"] is wrap_decoder_layers
        else:
            assert isinstance(strategy, DeepSpeedStrategy)
    assert cli.model.__class__.__name__ == "SFTModule"  # the stage config is intact


def test_fsdp_policy_wraps_decoder_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lit_ft.train.strategies import wrap_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = [type(m).__name__ for m in model.modules() if wrap_decoder_layers(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    assert wrap_decoder_layers(model, recurse=True, nonwrapped_numel=0)


RECIPES = [c for c in CONFIGS if "/recipes/" in c and c not in OVERLAYS]
# Per-family SFT recipes (a stage's recipe such as grpo_gsm8k.yaml is covered by test_config_instantiates alone).
FAMILY_RECIPES = [c for c in RECIPES if not Path(c).stem.startswith(("grpo_", "ppo_", "dpo_", "reward_"))]


@pytest.mark.parametrize("config", FAMILY_RECIPES, ids=[Path(c).stem for c in FAMILY_RECIPES])
def test_recipe_80gb_overrides_parse(config, tmp_path):
    """Each family recipe is the 24 GB setting; its `# 80GB:` comment line holds the overrides for one 80 GB GPU,
    which must parse too and change what they say (the 24 GB file itself is covered by test_config_instantiates)."""
    lines = [ln for ln in Path(config).read_text().splitlines() if ln.startswith("# 80GB: ")]
    assert len(lines) == 1, f"{config}: expected one '# 80GB: ' override line"
    overrides = lines[0].removeprefix("# 80GB: ").split()
    small = _cli(["--config", config, "--trainer.logger", "false"])
    big = _cli(["--config", config, "--trainer.logger", "false", *overrides])
    assert small.model.base.name_or_path == big.model.base.name_or_path
    assert small.model.base.attn_implementation == "auto" and small.model.lora.target_modules == ["all"]
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    if "--model.base.quantization" in pairs:
        assert (small.model.base.quantization, big.model.base.quantization) == ("nf4", pairs["--model.base.quantization"])
    assert big.datamodule.batch_size == int(pairs["--data.batch_size"]) > small.datamodule.batch_size


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[Path(c).stem for c in OVERLAYS])
def test_rlhf_overlays_compose_with_their_stage(overlay, tmp_path):
    """`lit-ft fit --config STAGE --config recipes/hh_rlhf/STAGE`: the overlay changes the stage's settings and keeps
    the rest (callbacks, logger); each later stage reads the earlier stages' runs; the command its comment gives for
    the policy along the run parses."""
    from lit_ft.data.recipes import resolve_config

    stage = Path(overlay).stem
    name = f"recipes/hh_rlhf/{stage}"
    args = ["--config", resolve_config(stage), "--config", resolve_config(name), "--trainer.logger", "false"]
    cli = _cli(args)
    alone = _cli(["--config", resolve_config(stage), "--trainer.logger", "false"])
    assert type(cli.model) is type(alone.model) and type(cli.datamodule) is type(alone.datamodule)
    assert cli.config["trainer"]["default_root_dir"] == f"runs/hh_{stage}"
    assert cli.datamodule.train_file == "pairs.jsonl" and cli.datamodule.max_length in (448, 512)
    assert len(cli.config["trainer"]["callbacks"]) == len(alone.config["trainer"]["callbacks"])
    if stage == "sft":
        assert cli.datamodule.format == "preference"
    for key in ("sft_adapter", "reward_adapter"):
        if getattr(alone.model, key, None) is not None:
            assert getattr(cli.model, key) == f"runs/hh_{key.split('_')[0]}/latest/adapter"
    if stage == "ppo":
        assert cli.model.reward_fn is None and cli.model.sampling.max_new_tokens == 64
        line = next(ln for ln in Path(overlay).read_text().splitlines() if "--trainer.callbacks+=" in ln)
        snap = _cli(args + line.lstrip("# ").split())
        export = [c for c in snap.trainer.callbacks if type(c).__name__ == "ExportAdapter"]
        assert [(e.dirpath.endswith("policy"), e.every_n_steps) for e in export[-1:]] == [(True, 80)]
