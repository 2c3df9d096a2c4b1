"""PPO end to end on the real SmolLM2-135M: config parsing (fast) and a couple of iterations with a reward adapter (slow)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_config_parses(tmp_path, monkeypatch):
    from lit_ft.cli.trainer import LitFTCLI
    from lit_ft.stages.ppo import PPOModule

    monkeypatch.chdir(tmp_path)  # the logger creates its save_dir
    cli = LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=["--config", str(ROOT / "configs/ppo.yaml"), "--trainer.logger", "false"])
    assert isinstance(cli.model, PPOModule)
    assert cli.model.ppo.target == 6.0 and cli.model.ppo.target_kl is None
    assert cli.model.reward_fn is not None and cli.model.reward_fn_weight == 2.0


def _fresh_adapters(model_dir: str, root: Path) -> tuple[str, str]:
    """An SFT-like LoRA and a SEQ_CLS reward LoRA with a score head, both random but non-trivial."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                    task_type="CAUSAL_LM"))
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm = get_peft_model(rm, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    for m in (sft, rm):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    for m, name in ((sft, "sft"), (rm, "reward")):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "reward" / "reward_normalization.json").write_text('{"gain": 0.5, "bias": 0.1}')
    return str(root / "sft"), str(root / "reward")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two spinning threads run 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_ppo_iterations_on_smollm2(smollm2_dir, tmp_path, one_thread):
    from lit_ft.data.modules import PromptDataModule
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.models import ModelSpec
    from lit_ft.train.optim import OptimSpec
    from lit_ft.callbacks.plots import MetricsPlot
    from lit_ft.stages.ppo import PPOModule, PPOSpec

    sft, reward = _fresh_adapters(smollm2_dir, tmp_path)
    dm = PromptDataModule(train_file=str(ROOT / "data/demo/prompts_train.jsonl"),
                          val_file=str(ROOT / "data/demo/prompts_val.jsonl"), tokenizer=smollm2_dir,
                          template="chat", batch_size=4)
    module = PPOModule(base=ModelSpec(name_or_path=smollm2_dir, dtype="float32"), lora=None, sft_adapter=sft,
                       reward_adapter=reward, reward_fn="lit_ft.data.tasks.correctness_reward", reward_fn_weight=0.0,
                       sampling=SamplingSpec(max_new_tokens=12), ppo=PPOSpec(ppo_epochs=1, mini_batch_size=4),
                       optim=OptimSpec(lr=1e-4, scheduler="constant", warmup_ratio=0.0), sample_table_every=0)
    plot = MetricsPlot(path=str(tmp_path / "metrics.png"))
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, callbacks=[plot]).fit(module, datamodule=dm)
    metrics = module.trainer.callback_metrics
    for name in ("objective/scores", "objective/kl", "objective/reward_model", "ppo/loss/policy", "ppo/loss/value"):
        assert torch.isfinite(metrics[name]), name
    assert len(plot.history["objective/scores"]) == 2 and (tmp_path / "metrics.png").exists()
    module.save_adapter(tmp_path / "out", dm.tokenizer)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
