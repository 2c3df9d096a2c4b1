"""SFT, reward modelling and DPO under DDP with two CPU processes (gloo): the same losses and weights as one process on
the same global batch, one checkpoint writer, and resume; KTO's reference point the same on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import ddp_run
from tests.test_resume import PAIRS, ROWS

SCRIPT = Path(__file__).parent / "ddp_run.py"


def _run(*args, timeout=150):
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parent.parent), OMP_NUM_THREADS="1", PL_DISABLE_FORK="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(SCRIPT.parent.parent))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(out: Path, tag: str, rank: int) -> dict[int, list[float]]:
    """step -> [this rank's mean loss, its weight (loss tokens)]."""
    return {int(k): v for k, v in json.loads((out / f"{tag}_losses_rank{rank}.json").read_text()).items()}


def _sft_rows(tokenizer) -> list[dict]:
    # Completions of different token counts: each rank's micro-batch has its own number of loss tokens, so a mean
    # of per-rank means (each micro-batch divided by its own count) would differ from one process's token mean.
    rows = [{"prompt": r["prompt"], "completion": r["completion"] + " Indeed." * (i % 3)} for i, r in enumerate(ROWS)]
    counts = {len(tokenizer(r["completion"])["input_ids"]) for r in rows[:12]}
    assert len(counts) > 1
    return rows[:12]


def _reward_rows(tokenizer) -> list[dict]:
    return PAIRS[:12]  # a mean over pairs: equal pair counts per rank make the mean of rank means the global one


# stage and its 12 training rows (3 global batches of 4 an epoch).
CASES = [("sft", _sft_rows), ("reward", _reward_rows), ("dpo", _reward_rows)]
# Final weights: Adam divides by sqrt(v) + 1e-8, so where a gradient is near 1e-8 the float noise of the all-reduce
# (relative 1e-7) moves a single element's step by up to ~1e-4 (how much depends on the CPU's kernels); a wrong
# gradient or batch moves every element by about the learning rate (1e-2) per step. Hence a loose bound on the
# largest difference and a tight one on the mean (reward gradients are noisier: mean differences near 1e-6).
MAX_DIFF, MEAN_DIFF = 1e-3, 1e-5  # a tenth and a thousandth of one step


@pytest.mark.parametrize("stage, rows", CASES, ids=[c[0] for c in CASES])
def test_ddp_two_processes_match_one_and_resume(stage, rows, tiny_model_dir, tiny_tokenizer, tmp_path):
    rows = rows(tiny_tokenizer)
    assert len(rows) == 12
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))

    one, two = tmp_path / "one", tmp_path / "two"
    ddp_run.main(stage, str(one), tiny_model_dir, str(train), 1, 6)  # one process (this one), 6 steps in one go
    _run(stage, two, tiny_model_dir, train, 2, 4)  # two processes, stopped after step 4 (mid-epoch) ...
    state = torch.load(two / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    loader_state.pop("digest")
    assert loader_state == {"epoch": 1, "position": 4, "seed": 0, "size": 12, "batch_size": 2}  # global position
    _run(stage, two, tiny_model_dir, train, 2, 6, two / "ckpt" / "last.ckpt")  # ... and resumed to 6

    single = _losses(one, "run", 0)
    ranks = [{**_losses(two, "run", r), **_losses(two, "resumed", r)} for r in (0, 1)]
    assert sorted(single) == sorted(ranks[0]) == sorted(ranks[1]) == [1, 2, 3, 4, 5, 6]
    for step, (loss, _) in single.items():  # the global token mean from the ranks' means and token counts
        (a, n_a), (b, n_b) = ranks[0][step], ranks[1][step]
        assert abs((a * n_a + b * n_b) / (n_a + n_b) - loss) < 1e-5, (step, loss, ranks[0][step], ranks[1][step])
    w1, w2 = torch.load(one / "run_adapter_rank0.pt"), torch.load(two / "resumed_adapter_rank0.pt")
    assert w1.keys() == w2.keys()
    for k in w1:
        diff = (w2[k] - w1[k]).abs()
        assert diff.max() < MAX_DIFF and diff.mean() < MEAN_DIFF, (k, diff.max().item(), diff.mean().item())

    # One writer: exactly the files ModelCheckpoint names, no temporary leftovers from a second rank.
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    state = torch.load(two / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert len(state["callbacks"]["ResumeRNG"]["ranks"]) == 2  # each rank's RNG state, gathered


def test_kto_reference_point_is_one_over_the_ranks(tiny_model_dir, tmp_path):
    """KTO under DDP: each rank's micro-batch makes its own mismatched pairs, and the KL estimate z0 is their mean
    over both ranks, so the two ranks train with the same z0 at every step (a rank's own estimate would differ: its
    batches differ). Desirable examples only (unpaired rows): raising them raises the mismatched pairs' log-ratios
    too, so z0 grows past 0, where the clamp would hide a difference."""
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in PAIRS[:12]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 3 global batches of 4
    _run("kto", tmp_path, tiny_model_dir, train, 2, 8)
    ranks = [_losses(tmp_path, "run", r) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 9))
    z0 = [[ranks[r][step][2] for step in range(1, 9)] for r in (0, 1)]
    assert z0[0] == pytest.approx(z0[1], abs=1e-6) and max(z0[0]) > 1e-3, z0
    assert z0[0][0] == 0.0  # the first step: policy == reference
    assert any(ranks[0][s][0] != ranks[1][s][0] for s in ranks[0])  # the ranks' own examples (and losses) differ


def test_ppo_under_ddp_keeps_the_ranks_in_step(tiny_model_dir, tmp_path):
    """PPO's update does two backward passes per minibatch (policy adapter, then value adapter) over different
    parameters, which DDP's per-backward all-reduce refuses; lit_ft averages the gradients once per optimizer step
    instead. Each rank rolls out its own prompts, so the ranks' losses differ while their weights must stay equal."""
    from tests.test_resume import PROMPTS

    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    _run("ppo", tmp_path, tiny_model_dir, train, 2, 0)  # 8 prompts, 2 rollouts of 2 prompts per rank
    losses = [_losses(tmp_path, "run", r) for r in (0, 1)]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2]
    assert losses[0] != losses[1], "both ranks rolled out the same prompts"
    w0, w1 = (torch.load(tmp_path / f"run_adapter_rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and any(".value." in k or "value_head" in k for k in w0)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    # New LoRA (no SFT adapter) starts with B = 0, the value head (no reward model) at 0: both must have moved.
    for role in ("policy", "value"):
        assert any(w.abs().sum() > 0 for k, w in w0.items() if f"lora_B.{role}" in k), role
    assert any(w.abs().sum() > 0 for k, w in w0.items() if "value_head" in k)


def _average_on_rank(rank: int, world: int, port: int, contributed: list[bool], out: str):
    import types

    from lit_ft.train.strategies import average_gradients

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        if contributed[rank]:
            a.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
            b.grad = torch.tensor([4.0, -4.0], dtype=torch.bfloat16) * (rank + 1)  # `a` alone may miss a grad
        # Lightning's DDPStrategy.model is a DistributedDataParallel; an instance without its constructor (whose
        # collectives and reducer are not what is tested here, and which can deadlock gloo's teardown) stands in.
        ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
        trainer = types.SimpleNamespace(world_size=world, strategy=types.SimpleNamespace(model=ddp))
        stepped = average_gradients(trainer, [a, b], contributed[rank])
        torch.save({"stepped": stepped, "a": a.grad, "b": b.grad}, f"{out}/rank{rank}.pt")
        torch.distributed.barrier()  # no rank tears the group down while another still talks
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("contributed, a, b", [
    ([True, True, True], [2.0, 4.0, 6.0], [8.0, -8.0]),        # mean over ranks of (r + 1) x grad
    ([True, False, True], [2.0, 4.0, 6.0], [8.0, -8.0]),       # rank 1 skipped: mean of ranks 0 and 2
    ([False, False, False], None, None),                       # nobody back-propagated: no step
])
def test_average_gradients_is_the_mean_over_contributing_ranks(contributed, a, b, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = torch.multiprocessing.spawn(_average_on_rank, args=(3, port, contributed, str(tmp_path)), nprocs=3,
                                        join=False)
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("the three ranks did not finish within 120 s")
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["stepped"] == (a is not None)
        if a is not None:
            torch.testing.assert_close(got["a"], torch.tensor(a), rtol=0, atol=0)
            assert got["b"].dtype == torch.bfloat16
            torch.testing.assert_close(got["b"], torch.tensor(b, dtype=torch.bfloat16), rtol=0, atol=0)


def test_grpo_under_ddp_keeps_the_ranks_in_step(tiny_model_dir, tmp_path):
    """GRPO with dynamic sampling: each rank drops its own groups of equal rewards, so the ranks train on different
    numbers of rows (some on none); they still take the same optimizer steps and their weights stay equal."""
    from tests.test_resume import PROMPTS

    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    _run("grpo", tmp_path, tiny_model_dir, train, 2, 0)  # 8 prompts, 2 rollouts of 2 prompts x 2 samples per rank
    rewards = [_losses(tmp_path, "run", r) for r in (0, 1)]
    assert sorted(rewards[0]) == sorted(rewards[1]) == [1, 2]
    assert rewards[0] != rewards[1], "both ranks rolled out the same prompts"
    w0, w1 = (torch.load(tmp_path / f"run_adapter_rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(".policy." in k for k in w0)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    assert any(w.abs().sum() > 0 for k, w in w0.items() if "lora_B" in k)  # new LoRA: B starts at 0 and moved
