"""`lit-ft demo` (lit_ft/demo.py): the summary it prints from each stage's output, and the whole default demo
(SFT -> GRPO, the shipped recipes) on a tiny random model from an empty directory."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_ft.cli.demo import binomial_se, main, parse
from lit_ft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

SFT_OUT = """[validation (sanity check, 2 batches) step 0] val/loss 0.7871  val/ppl 2.197
[before training] exact_match on 64 held-out prompts: 0.000
  prompt: 'What is 1 + 2?'
[train step 10] train/loss 0.1576
[after training] exact_match on 64 held-out prompts: 0.516
exact_match: 0.000 -> 0.516
"""
GRPO_OUT = """[before training] exact_match on 200 held-out prompts: 0.470
[after training] exact_match on 200 held-out prompts: 0.515
exact_match: 0.470 -> 0.515 (paired over 200 prompts: 13 better, 4 worse; change +0.045, standard error 0.018)
"""
REWARD_OUT = """[validation (sanity check, 2 batches) step 0] val/accuracy 0.5200  val/loss 0.6931
[train step 10] train/loss 0.6
[validation step 30] val/accuracy 0.7550  val/accuracy/near_miss 0.5100  val/loss 0.39
"""


def test_binomial_standard_error_by_hand():
    assert binomial_se(0.5, 64) == pytest.approx(0.0625)  # sqrt(0.25 / 64)
    assert binomial_se(0.46, 200) == pytest.approx(math.sqrt(0.46 * 0.54 / 200))  # 0.0352
    assert binomial_se(0.0, 64) == 0.0


def test_summary_reads_before_after_and_size_of_each_stage():
    r = parse("sft", SFT_OUT, 135.0)
    assert (r.metric, r.before, r.after, r.n) == ("exact_match", 0.0, 0.516, 64)
    se = math.sqrt(0.516 * 0.484 / 64)  # 0.0625; the before (0.000) has none
    assert r.line() == (f"sft       2:15  exact_match 0.000 -> 0.516 on 64 held-out (standard error 0.000 / {se:.3f}; "
                        f"the gain is {0.516 / se:.1f}x its standard error)")
    rm = parse("reward", REWARD_OUT)
    assert (rm.metric, rm.before, rm.after, rm.n) == ("val/accuracy", 0.52, 0.755, None)
    assert parse("ppo", "nothing here").metric == "(no metric printed)"


def test_summary_uses_the_paired_standard_error_where_the_stage_printed_it():
    r = parse("grpo", GRPO_OUT, 200.0)
    assert (r.before, r.after, r.n, r.paired) == (0.470, 0.515, 200, (13, 4, 0.045, 0.018))
    assert r.line() == ("grpo      3:20  exact_match 0.470 -> 0.515 on 200 held-out (13 better, 4 worse; paired "
                        "standard error 0.018; the change is +2.5x it)")  # 0.045 / 0.018


def test_unknown_stage_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"--stages: \['rm'\]: expected some of sft, reward, ppo, grpo, dpo"):
        main(["--stages", "sft,rm"])


@pytest.mark.slow
def test_default_demo_runs_sft_then_grpo_from_an_empty_directory(tiny_model_dir, tmp_path):
    """The shipped recipes as the demo runs them (only the model swapped for a tiny random one, no W&B): both
    stages finish, GRPO starts from the SFT adapter, and the summary names each metric with its held-out size."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "lit_ft", "demo", "--", "--model.base.name_or_path", tiny_model_dir,
                          "--trainer.logger", "false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout[out.stdout.index("demo done in"):]
    assert "sft " in summary and "exact_match" in summary and "on 64 held-out" in summary
    assert "grpo " in summary and "on 200 held-out" in summary
    assert (tmp_path / "runs/sft/latest/adapter").is_dir() and (tmp_path / "runs/grpo/latest/adapter").is_dir()


def test_large_heldout_evaluation_script(tiny_model_dir, tmp_path):
    """benchmarks/eval_heldout.py: fresh problems (none in the demo's files, distinct, seeded) scored per adapter;
    two adapters with the same weights change nothing, and the paired figures say so."""
    import importlib.util
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("eval_heldout", REPO / "benchmarks" / "eval_heldout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    problems = bench.fresh_problems(300, seed=5)
    demo = {json.loads(x)["prompt"] for f in ("prompts_train.jsonl", "prompts_val.jsonl")
            for x in (REPO / "data/demo" / f).read_text().splitlines()}
    assert len({q for q, _ in problems}) == 300 and not demo & {q for q, _ in problems}
    assert problems == bench.fresh_problems(300, seed=5) != bench.fresh_problems(300, seed=6)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    out = tmp_path / "heldout.json"
    bench.main(["--adapters", str(adapter), str(adapter), "--n", "12", "--batch", "5", "--base", tiny_model_dir,
                "--out", str(out)])
    first, second = json.loads(out.read_text())["results"]
    assert first["n"] == second["n"] == 12 and first["exact_match"] == second["exact_match"]
    assert (second["better"], second["worse"], second["change"], second["standard_error"]) == (0, 0, 0.0, 0.0)
