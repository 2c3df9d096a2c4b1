"""Exact resume (a killed run continued from `last.ckpt` repeats the uninterrupted one bit for bit) for the three
stages (SFT, reward model, PPO), the resumable loader, atomic checkpoint writes, and exporting the best
checkpoint's adapter."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.train import integrity
from lit_ft.callbacks import ExportAdapter
from lit_ft.data.modules import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.grpo import GRPOModule, GRPOSpec
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.stages.ppo import PPOModule, PPOSpec
from lit_ft.train.resume import AtomicCheckpointIO, ResumableDataLoader, ResumeRNG
from lit_ft.stages.reward import RewardModule
from lit_ft.stages.sft import SFTModule

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(4) for b in range(4)]
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
          "rejected": f"The answer is {a + b + 1}."} for a in range(4) for b in range(4)]
PROMPTS = [{"prompt": q} for q in ("What is 12 plus 30?", "hello there", "Add the numbers.", "the quick brown fox",
                                   "reward model", "how can I help you", "question answer", "The lazy dog")]
# Dropout on (RNG matters), a schedule that depends on the step count, weight decay.
LORA = LoraSpec(r=4, alpha=8, dropout=0.2)
OPTIM = OptimSpec(lr=1e-2, weight_decay=0.01, warmup_ratio=0.25, scheduler="cosine")
# Per rollout: sampled responses and their scores, KL and its adaptive coefficient, the PPO losses.
PPO_METRICS = ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/response_length",
               "ppo/loss/policy", "ppo/loss/value", "ppo/returns/mean")


def _loss(trainer, outputs) -> torch.Tensor:
    return outputs["loss"].detach().clone()


def _ppo_metrics(trainer, outputs) -> torch.Tensor:
    return torch.stack([trainer.callback_metrics[k].detach().clone() for k in PPO_METRICS])


def _ppo_module(model_dir) -> PPOModule:
    # Random response lengths (Python RNG) and sampling (torch RNG); an adaptive KL coefficient that moves every
    # rollout (target far below the KL, short horizon); two PPO epochs of two shuffled minibatches per rollout.
    return PPOModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), lora=LORA,
                     reward_fn="tests.test_ppo.uppercase_share",
                     sampling=SamplingSpec(max_new_tokens=8, min_new_tokens=4),
                     ppo=PPOSpec(ppo_epochs=2, mini_batch_size=2, init_kl_coef=0.2, target=0.001, horizon=20.0),
                     optim=OptimSpec(lr=1e-3, weight_decay=0.01, warmup_ratio=0.25, scheduler="cosine"),
                     sample_table_every=0)


GRPO_METRICS = ("train/reward", "train/kl", "train/entropy", "train/loss", "train/completions/mean_length",
                "train/clip_ratio/region_mean", "train/reward_std")


def _grpo_metrics(trainer, outputs) -> torch.Tensor:
    return torch.stack([trainer.callback_metrics[k].detach().clone() for k in GRPO_METRICS])


def _grpo_module(model_dir, reward_fn="tests.test_ppo.uppercase_share", mini_batch_size=4,
                 dynamic_sampling=False) -> GRPOModule:
    # Random response lengths and sampling as PPO's; 2 samples a prompt, 2 iterations of 2 shuffled minibatches, a
    # KL term, clip-higher and a schedule that depends on the step count.
    return GRPOModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), lora=LORA, reward_fn=reward_fn,
                      sampling=SamplingSpec(max_new_tokens=8, min_new_tokens=4),
                      grpo=GRPOSpec(samples_per_prompt=2, num_iterations=2, mini_batch_size=mini_batch_size, beta=0.04,
                                    dynamic_sampling=dynamic_sampling),
                      optim=OptimSpec(lr=1e-3, weight_decay=0.01, warmup_ratio=0.25, scheduler="cosine"),
                      sample_table_every=0)


GRPO_ENV_METRICS = GRPO_METRICS + ("rollout/env_tokens_mean", "rollout/turns_mean", "train/rewards/environment/mean")


def _grpo_env_metrics(trainer, outputs) -> torch.Tensor:
    return torch.stack([trainer.callback_metrics[k].detach().clone() for k in GRPO_ENV_METRICS])


def _grpo_env_module(model_dir) -> GRPOModule:
    # Multi-turn episodes (tests/test_episodes.py): a model that often ends its turn, an environment that answers
    # each turn and ends the episode after the second; as GRPO's otherwise.
    from lit_ft.online.episodes import EpisodeSpec
    from tests.test_episodes import Again, eos_biased_model

    d = Path(f"{model_dir}_eos")
    if not (d / "config.json").exists():
        d.mkdir(exist_ok=True)
        with torch.random.fork_rng():  # the first run builds it: the runs' RNG stays the same
            eos_biased_model(str(d))
    return GRPOModule(base=ModelSpec(name_or_path=str(d), dtype="float32"), lora=LORA,
                      sampling=SamplingSpec(max_new_tokens=8),
                      grpo=GRPOSpec(samples_per_prompt=2, num_iterations=2, mini_batch_size=4, beta=0.04),
                      optim=OptimSpec(lr=1e-3, weight_decay=0.01, warmup_ratio=0.25, scheduler="cosine"),
                      sample_table_every=0, environment=Again(), episodes=EpisodeSpec(max_turns=3, max_tokens=64))


@dataclass(frozen=True)
class Stage:
    """A stage under the kill-and-resume test: its data and module, and what is compared after every batch."""

    rows: list[dict]
    datamodule: type
    module: Callable[[str], L.LightningModule]
    record: Callable  # (trainer, outputs of the batch) -> tensor compared with torch.equal
    epochs: int
    kills: dict[str, int]  # training batches done when the run dies: one mid-epoch, one at an epoch end
    steps_per_batch: int = 1  # optimizer steps per training batch (PPO: ppo_epochs x minibatches per rollout)
    # Run length as `max_steps` (configs/sft.yaml) or as `max_epochs` (configs/ppo.yaml; the loader is then built
    # before the checkpoint is read, see lit_ft.train.resume.ResumeLoaderState).
    by_steps: bool = False
    batch_size: int = 4
    data_kwargs: dict = field(default_factory=dict)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    @property
    def total(self) -> int:
        return self.epochs * self.batches_per_epoch


STAGES = {
    # 16 rows (pairs) / batch 4 = 4 steps an epoch, 3 epochs.
    "sft": Stage(ROWS, InstructionDataModule, lambda d: SFTModule(base=ModelSpec(name_or_path=d), lora=LORA,
                                                                  optim=OPTIM),
                 _loss, epochs=3, kills={"mid_epoch": 7, "epoch_end": 8}, by_steps=True),
    "reward": Stage(PAIRS, PreferenceDataModule, lambda d: RewardModule(ModelSpec(name_or_path=d), LORA, OPTIM),
                    _loss, epochs=3, kills={"mid_epoch": 7, "epoch_end": 8}),
    # 8 prompts / batch 4 = 2 rollouts an epoch, 3 epochs; 2 PPO epochs x 2 minibatches = 4 optimizer steps a rollout.
    "ppo": Stage(PROMPTS, PromptDataModule, _ppo_module, _ppo_metrics, epochs=3,
                 kills={"mid_epoch": 3, "epoch_end": 4}, steps_per_batch=4, data_kwargs={"answer_field": None}),
    # 4 prompts x 2 samples = 8 rows a rollout; 2 iterations x 2 minibatches of 4 = 4 optimizer steps a rollout.
    "grpo": Stage(PROMPTS, PromptDataModule, _grpo_module, _grpo_metrics, epochs=3,
                  kills={"mid_epoch": 3, "epoch_end": 4}, steps_per_batch=4, data_kwargs={"answer_field": None}),
    # GRPO's, the rollouts multi-turn episodes against an environment.
    "grpo_env": Stage(PROMPTS, PromptDataModule, _grpo_env_module, _grpo_env_metrics, epochs=3,
                      kills={"mid_epoch": 3}, steps_per_batch=4, data_kwargs={"answer_field": None}),
}
KILLS = [(s, k) for s, stage in STAGES.items() for k in stage.kills]


class Killed(RuntimeError):
    pass


class Recorder(L.Callback):
    """`record(trainer, outputs)` after every training batch, keyed by the batch's number in the run (from 1;
    SFT and reward: the global step), and a simulated kill before batch `kill_after + 1` (after the checkpoint
    that `ModelCheckpoint` wrote at the end of batch `kill_after`)."""

    def __init__(self, record=_loss, kill_after: int | None = None):
        self.record, self.kill_after = record, kill_after
        self.values: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_after is not None and trainer.fit_loop.epoch_loop.total_batch_idx == self.kill_after:
            raise Killed(f"killed after batch {self.kill_after}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values[trainer.fit_loop.epoch_loop.total_batch_idx + 1] = self.record(trainer, outputs)


def _final(module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (PPO: policy and value adapters and the value head), and PPO's counters and KL
    coefficient."""
    state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    if isinstance(module, PPOModule):
        state.update({f"counters/{k}": torch.tensor(v) for k, v in module.counters.items()})
        state["kl_coef"] = torch.tensor(module.kl_ctl.value, dtype=torch.float64)
    if isinstance(module, GRPOModule):
        state.update({f"counters/{k}": torch.tensor(v) for k, v in module.counters.items()})
    return state


class Runs:
    """One stage's data module, its uninterrupted run and its killed runs, each run once per test module."""

    def __init__(self, stage: Stage, model_dir: str, tmp_path_factory):
        self.stage, self.model_dir, self.tmp = stage, model_dir, tmp_path_factory
        d = tmp_path_factory.mktemp("resume_data")
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage.rows))
        (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage.rows[:4]))
        self.dm = stage.datamodule(train_file=str(d / "train.jsonl"), val_file=str(d / "val.jsonl"),
                                   tokenizer=model_dir, batch_size=stage.batch_size, max_length=64,
                                   **stage.data_kwargs)
        self.dm.setup("fit")
        self._uninterrupted = None
        self._killed: dict[int, tuple[Path, dict]] = {}

    def fit(self, root: Path, recorder: Recorder, ckpt_path=None, every: int | None = None):
        """A run of the stage, checkpointing every `every` training batches (default: at the end)."""
        stage = self.stage
        L.seed_everything(0)
        ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=-1,
                               every_n_train_steps=(every or stage.total) * stage.steps_per_batch)
        length = {"max_steps": stage.total} if stage.by_steps else {"max_epochs": stage.epochs}
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(root), callbacks=[ckpt, recorder], plugins=[AtomicCheckpointIO()],
            num_sanity_val_steps=0, limit_val_batches=1, **length,
        )
        module = stage.module(self.model_dir)
        trainer.fit(module, datamodule=self.dm, ckpt_path=ckpt_path)
        return module, trainer

    def resume(self, ckpt_path, root: Path) -> tuple[dict, L.LightningModule, L.Trainer]:
        rec = Recorder(self.stage.record)
        module, trainer = self.fit(root, rec, ckpt_path=str(ckpt_path))
        return rec.values, module, trainer

    @property
    def uninterrupted(self) -> tuple[dict, dict]:
        """(recorded values per batch, final trainable weights) of the run that is never stopped."""
        if self._uninterrupted is None:
            rec = Recorder(self.stage.record)
            module, _ = self.fit(self.tmp.mktemp("whole"), rec)
            self._uninterrupted = rec.values, _final(module)
        return self._uninterrupted

    def killed(self, kill_after: int) -> tuple[Path, dict]:
        """(checkpoint dir, recorded values) of a run killed after batch `kill_after`."""
        if kill_after not in self._killed:
            root = self.tmp.mktemp(f"killed_{kill_after}")
            rec = Recorder(self.stage.record, kill_after=kill_after)
            with pytest.raises(Killed):
                self.fit(root, rec, every=kill_after)
            self._killed[kill_after] = root / "ckpt", rec.values
        return self._killed[kill_after]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Callable[[str], Runs]:
    cache: dict[str, Runs] = {}

    def get(name: str) -> Runs:
        if name not in cache:
            cache[name] = Runs(STAGES[name], tiny_model_dir, tmp_path_factory)
        return cache[name]

    return get


@pytest.mark.parametrize("stage, kill", KILLS, ids=[f"{s}-{k}" for s, k in KILLS])
def test_killed_run_resumes_exactly(stage, kill, runs, tmp_path):
    """Batches after the kill (SFT, reward: the loss; PPO: the rollout's metrics) and the final trainable weights
    equal the uninterrupted run's exactly (torch.equal)."""
    run, spec = runs(stage), STAGES[stage]
    kill_after = spec.kills[kill]
    values, weights = run.uninterrupted
    ckpt_dir, first = run.killed(kill_after)
    assert sorted(first) == list(range(1, kill_after + 1))
    for batch, value in first.items():
        assert torch.equal(value, values[batch]), batch
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == kill_after * spec.steps_per_batch and "ResumeRNG" in state["callbacks"]
    assert state["optimizer_states"] and state["lr_schedulers"]
    epoch = (kill_after - 1) // spec.batches_per_epoch
    position = spec.batch_size * (kill_after - epoch * spec.batches_per_epoch)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    digest = loader_state.pop("digest")
    assert loader_state == {"epoch": epoch, "position": position, "seed": 0, "size": len(spec.rows),
                            "batch_size": spec.batch_size}
    assert isinstance(digest, str) and len(digest) == 64  # the rows' content (tests/test_checkpoint_safety.py)

    second, module, trainer = run.resume(ckpt_dir / "last.ckpt", tmp_path)
    assert trainer.global_step == spec.total * spec.steps_per_batch
    assert sorted(second) == list(range(kill_after + 1, spec.total + 1))
    for batch, value in second.items():
        assert torch.equal(value, values[batch]), (batch, value.tolist(), values[batch].tolist())
    resumed = _final(module)
    assert resumed.keys() == weights.keys()
    assert [k for k in weights if not torch.equal(resumed[k], weights[k])] == []


def _without(state: dict, *path: str) -> None:
    *parents, last = path
    for key in parents:
        state = state[key]
    del state[last]


# What repeats the interrupted run only because the checkpoint carries it: without it the batch right after the
# resume differs (dropout masks, sampled responses, the KL penalty's coefficient).
DROPS = [("sft", ("callbacks", "ResumeRNG")), ("reward", ("callbacks", "ResumeRNG")),
         ("ppo", ("callbacks", "ResumeRNG")), ("ppo", ("kl_controller",)), ("grpo", ("callbacks", "ResumeRNG"))]


@pytest.mark.parametrize("stage, path", DROPS, ids=[f"{s}-{p[-1]}" for s, p in DROPS])
def test_resume_without_saved_state_differs(stage, path, runs, tmp_path):
    run = runs(stage)
    values, _ = run.uninterrupted
    kill_after = STAGES[stage].kills["mid_epoch"]
    ckpt_dir, _ = run.killed(kill_after)
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    _without(state, *path)
    integrity.seal(state)  # as written by a version without that state (an edited, unsealed one is refused)
    torch.save(state, tmp_path / "partial.ckpt")
    second, _, _ = run.resume(tmp_path / "partial.ckpt", tmp_path)
    assert not torch.equal(second[kill_after + 1], values[kill_after + 1])


def test_loader_resumes_mid_epoch_and_across_world_sizes():
    ds = list(range(10))
    whole = ResumableDataLoader(ds, batch_size=2, seed=3)
    whole.sampler.set_epoch(1)
    expected = [b.tolist() for b in whole]
    assert sorted(sum(expected, [])) == ds

    part = ResumableDataLoader(ds, batch_size=2, seed=3)
    part.sampler.set_epoch(1)
    it = iter(part)
    seen = [next(it).tolist() for _ in range(2)]
    state = part.state_dict()
    assert state == {"epoch": 1, "position": 4, "seed": 3, "size": 10, "digest": None, "batch_size": 2}

    again = ResumableDataLoader(ds, batch_size=2, seed=3)
    again.load_state_dict(state)
    again.sampler.set_epoch(1)  # what Lightning does at the start of the (resumed) epoch
    assert seen + [b.tolist() for b in again] == expected
    assert len(again) == 5  # the full epoch: Lightning's counters already hold the consumed batches

    # Two ranks continuing from the same global position split exactly the samples one rank had left.
    shards = []
    for rank in range(2):
        loader = ResumableDataLoader(ds, batch_size=1, seed=3)
        loader.sampler.num_replicas, loader.sampler.rank = 2, rank
        loader.load_state_dict(state)
        shards += [int(b) for b in loader]
    assert sorted(shards) == sorted(sum(expected[2:], []))

    # The next epoch starts at its beginning, in a new order.
    again.sampler.set_epoch(2)
    nxt = [b.tolist() for b in again]
    assert sorted(sum(nxt, [])) == ds and nxt != expected


def test_rng_callback_round_trips_every_generator():
    import random

    import numpy as np

    cb = ResumeRNG()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = cb.state_dict()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    cb.load_state_dict(state)
    cb.on_train_batch_start(None, None, None, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk died mid-save")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="mid-save"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()

    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial temp file left behind
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


class _Opaque:  # any pickled object that is not a tensor or a plain value
    pass


def test_checkpoint_io_loads_weights_only(tmp_path):
    torch.save({"x": _Opaque()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_export_adapter_best_exports_best_not_last(tiny_model_dir, runs, tmp_path):
    """With best=True the exported adapter holds the weights of the best-scoring checkpoint."""
    from safetensors.torch import load_file

    class Score(L.Callback):  # a monitored metric that is best at step 2 of 4
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log("score", float(abs(trainer.global_step - 2)))

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="score", mode="min", save_top_k=1,
                           every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[Score(), ckpt, ExportAdapter(str(tmp_path / "adapter"), best=True)])
    module = STAGES["sft"].module(tiny_model_dir)
    trainer.fit(module, datamodule=runs("sft").dm)
    assert Path(ckpt.best_model_path).name == "epoch=0-step=2.ckpt"

    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert len(exported) == len(best) > 0
    for key, value in exported.items():
        name = next(k for k in best if k.endswith(key.replace(".weight", ".default.weight")))
        assert torch.equal(value, best[name])
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_export_adapter_best_refuses_a_checkpoint_that_matches_no_parameter(tiny_model_dir, runs, tmp_path):
    """A best checkpoint whose tensors the module cannot take (as under FSDP's wrapped names) is an error, not a
    silent export of the last weights."""
    module = STAGES["sft"].module(tiny_model_dir)
    slim = module.on_save_checkpoint

    def renamed(checkpoint):  # the module's own (slim) checkpoint, its tensors under other names
        slim(checkpoint)
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("model.", "model.wrapped.", 1): v for k, v in state.items()}
        integrity.seal(checkpoint)

    module.on_save_checkpoint = renamed
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train/loss", save_top_k=1, every_n_train_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[ckpt, ExportAdapter(str(tmp_path / "adapter"), best=True)])
    with pytest.raises(RuntimeError, match=r"ExportAdapter\(best=True\): \d+ tensors of .*step=\d\.ckpt match no "
                                           r"parameter of the module \(first: model\.wrapped\."):
        trainer.fit(module, datamodule=runs("sft").dm)
    assert not (tmp_path / "adapter").exists()


def test_data_digest_reads_the_rows_not_the_datasets_fingerprint():
    """`datasets` stores its cache fingerprint in the Arrow schema; it changes with the environment (HF_HUB_OFFLINE
    among others) for the same rows, and must not make a resume refuse unchanged data."""
    import datasets

    from lit_ft.train.resume import dataset_digest

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[-100, 2], [3]]})
    same_rows = ds.map(lambda row: row, new_fingerprint="another")
    assert ds.with_format("arrow")[:].schema.metadata != same_rows.with_format("arrow")[:].schema.metadata
    assert dataset_digest(ds) == dataset_digest(same_rows)
    assert dataset_digest(ds, legacy=True) != dataset_digest(same_rows, legacy=True)  # what the old digest did
    edited = datasets.Dataset.from_dict({"input_ids": [[1, 2], [4]], "labels": [[-100, 2], [3]]})
    assert dataset_digest(edited) != dataset_digest(ds)
