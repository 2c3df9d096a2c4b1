"""Callbacks that talk to W&B: offline by default, sample tables reach the run file, no secrets on disk."""

from __future__ import annotations

import re

import pytest
import torch


def test_offline_by_default_and_tables_reach_the_run(tmp_path, monkeypatch):
    from lit_ft.callbacks import WandbLogger
    from lit_ft.train.metrics import log_table

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
    from lit_ft.callbacks import logging as callbacks

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # WANDB_MODE, when set, decides (test_wandb_mode_is_obeyed)
    seen = {}
    monkeypatch.setattr(callbacks._LightningWandbLogger, "__init__",
                        lambda self, **kw: seen.update(kw))
    callbacks.WandbLogger(save_dir=str(tmp_path))
    assert seen["offline"] is False


def test_resolve_callable_names_bad_paths():
    from lit_ft.online.scoring import resolve_callable
    from lit_ft.data.tasks import correctness_reward

    assert resolve_callable("lit_ft.data.tasks.correctness_reward") is correctness_reward
    with pytest.raises(ValueError, match="not a dotted path"):
        resolve_callable("correctness_reward")


def test_print_metrics_writes_validation_and_training_lines(caplog):
    import lightning as L
    import torch

    from lit_ft.callbacks import PrintMetrics

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            loss = (self.w * batch[0]).sum()
            self.log("train/loss", loss)
            self.log_dict({"rollout/kl_sampler_train": 0.5, "time/update": 0.25, "other/x": 1.0})
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/accuracy", torch.tensor(0.75))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((4, 1), 2.0)), batch_size=1)
    trainer = L.Trainer(max_steps=4, val_check_interval=4, callbacks=[PrintMetrics(every_n_steps=2)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    with caplog.at_level("INFO"):
        trainer.fit(Tiny(), data, data)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert lines[0].startswith("[start] device cpu") and lines[-1].startswith("[end] step 4 after 0:00:")
    assert "peak resident memory" in lines[-1]
    train = [x for x in lines if x.startswith("[train")]
    # the online stages' mismatch (rollout/) and phase times (time/) too; other prefixes are not printed
    shown = "rollout/kl_sampler_train 0.5  time/update 0.25  train/loss 2"
    assert [x.split(" | ")[0].strip() for x in train] == [f"[train step 2] {shown}", f"[train step 4] {shown}"]
    # progress: steps done of the total, the optimizer's lr (0.0 here), elapsed and the ETA (0 left at the end)
    assert re.fullmatch(r"2/4  lr 0  elapsed 0:00:\d\d  eta 0:00:\d\d", train[0].split(" | ")[1]), train[0]
    assert re.fullmatch(r"4/4  lr 0  elapsed 0:00:\d\d  eta 0:00:00", train[1].split(" | ")[1]), train[1]
    assert "[validation step 4] val/accuracy 0.75" in lines


def test_generation_runs_in_the_trainers_precision_context():
    """Sample generations and PPO rollouts run outside training_step: `for_generation` gives them its autocast."""
    import lightning as L
    import torch

    from lit_ft.train.strategies import for_generation

    for precision, expected in (("bf16-mixed", True), ("32-true", False)):
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
        with for_generation(trainer):
            assert torch.is_autocast_enabled("cpu") is expected
            if expected:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with for_generation(None):
        assert not torch.is_autocast_enabled("cpu")


def test_paired_change_by_hand():
    from lit_ft.callbacks import paired_change

    before = [1, 0, 0, 1, 0, 1, 0, 0]
    after = [1, 1, 1, 0, 0, 1, 1, 0]  # 3 better, 1 worse: changes d = [0, 1, 1, -1, 0, 0, 1, 0]
    better, worse, mean, se = paired_change(before, after)
    # mean 2/8 = 0.25; sum (d - 0.25)^2 = 4 x 0.0625 + 3 x 0.5625 + 1.5625 = 3.5; var 3.5 / 7 = 0.5; se sqrt(0.5 / 8)
    assert (better, worse) == (3, 1)
    assert mean == pytest.approx(0.25) and se == pytest.approx(0.25)
    assert paired_change([1, 0], [1, 0])[2:] == (0.0, 0.0)  # nothing changed: no noise either
    with pytest.raises(ValueError):
        paired_change([1, 0], [1])  # not the same examples


def test_throughput_is_the_windows_tokens_over_the_time_between_batch_ends(monkeypatch):
    """`ThroughputLogger`: the tokens of the last `window` batches over the wall time from the end of the batch
    before each, so the time between batches (data loading, the loop) counts and validation does not; the tokens
    stay tensors (summed where the batch is: no wait for the GPU) until the logged rate is read."""
    from lit_ft.callbacks import logging as cb

    now = [0.0]
    monkeypatch.setattr(cb.time, "perf_counter", lambda: now[0])
    logged = []
    module = type("M", (), {"log": lambda self, k, v, **kw: logged.append(v)})()
    logger = cb.ThroughputLogger(window=2)

    def batch(n):
        return {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": (torch.arange(8) < n)[None].long()}

    logger.on_train_start(None, module)
    # (tokens, batch start, batch end): 1 s of loading before the second and third batches, validation after
    for i, (n, start, end) in enumerate([(4, 0.0, 1.0), (6, 2.0, 3.0), (3, 4.0, 6.0)]):
        now[0] = start
        logger.on_train_batch_start(None, module, batch(n), i)
        now[0] = end
        logger.on_train_batch_end(None, module, None, batch(n), i)
    logger.on_validation_end(None, module)
    now[0] = 100.0
    logger.on_train_batch_start(None, module, batch(8), 3)
    now[0] = 101.0
    logger.on_train_batch_end(None, module, None, batch(8), 3)
    assert all(torch.is_tensor(v) for v in logged)
    # intervals between batch ends: 1, 2 (the loading counted), 3, then 1 from the start after validation
    assert [float(v) for v in logged] == pytest.approx([4 / 1, 10 / 3, 9 / 5, 11 / 4])


def test_throughput_counts_the_real_tokens_of_padded_and_packed_batches():
    """`perf/tokens_per_sec` counts real tokens: a packed batch's all-ones mask covers its padding tail too."""
    from lit_ft.callbacks.logging import token_count
    from lit_ft.data.collate import PackedPreferenceCollator, PackedSFTCollator, SFTCollator

    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 3, 7)]
    assert token_count(SFTCollator(0)(rows)) == 15
    packed = PackedSFTCollator(0, max_length=8)(rows)  # rows of 7, 5 + 3: the 7-token row has a 1-token tail
    assert packed["attention_mask"].sum() == 16 and token_count(packed) == 15
    pairs = [{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2, 3, 4, 5], "prompt_length": 1,
              "margin": None}]
    packed = PackedPreferenceCollator(0, max_length=6)(pairs)  # rows of 5 and 3 (+ a 2-token tail)
    assert packed["attention_mask"].sum() == 10 and token_count(packed) == 8
