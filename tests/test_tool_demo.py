"""The tool demo (`lit-ft demo --stages sft_tools,grpo_tools`): `HeldOutEpisodes` plays held-out questions against
the calculator and reports exact match, the share of answers that used the tool and their paired changes; the demo's
summary shows them; both shipped tool recipes run end to end on a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_ft.cli.demo import parse

REPO = Path(__file__).resolve().parents[1]

TOOLS_OUT = """[before training] exact_match on 64 held-out prompts: 0.000
[before training] tool use on 64 held-out prompts: 0.000
[after training] exact_match on 64 held-out prompts: 0.812
[after training] tool use on 64 held-out prompts: 0.969
exact_match: 0.000 -> 0.812 (paired over 64 prompts: 52 better, 0 worse; change +0.812, standard error 0.049)
tool use: 0.000 -> 0.969 (paired over 64 prompts: 62 better, 0 worse; change +0.969, standard error 0.022)
"""


def test_summary_shows_exact_match_with_its_paired_error_and_the_tool_use_share():
    r = parse("sft_tools", TOOLS_OUT, 150.0)
    assert (r.before, r.after, r.n, r.paired, r.tool_use) == (0.0, 0.812, 64, (52, 0, 0.812, 0.049), (0.0, 0.969))
    assert r.line() == ("sft_tools   2:30  exact_match 0.000 -> 0.812 on 64 held-out (52 better, 0 worse; paired "
                        "standard error 0.049; the change is +16.6x it); tool use 0.000 -> 0.969")


class Scripted:
    """A sampler answering every episode of a round with the same text (then EOS), round by round."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.round, self.weights = tok, texts, 0, None

    def __call__(self, ids, mask, spec, max_new_tokens=None, logprobs=False):
        t = self.tok(self.texts[self.round], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        self.round += 1
        out = torch.tensor([t] * len(ids))
        return out, torch.ones_like(out), torch.zeros(out.shape)


def test_heldout_episodes_measure_exact_match_and_tool_use(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Two questions; the scripted model calls add(2, 3) on both, then answers 5: the calculator runs the call,
    the first answer is right, the second wrong; both used the tool."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_ft.callbacks import episodes as cb_module
    from lit_ft.callbacks.episodes import HeldOutEpisodes
    from lit_ft.data.tools import hermes_call

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "What is 2 + 3?", "answer": "5"},
                                                                {"prompt": "What is 7 - 4?", "answer": "3"}]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    samplers = []

    def make(*args, **kwargs):
        samplers.append(Scripted(tok, [hermes_call(call), "2 + 3 = 5"]))
        return samplers[-1]

    monkeypatch.setattr(cb_module.decode, "Sampler", make)
    cb = HeldOutEpisodes(environment={"class_path": "lit_ft.CalculatorEnvironment"}, prompts_file=str(prompts))
    module = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer=tok,
                             device=torch.device("cpu"))
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = cb.evaluate(trainer, module)
    assert [(r[0], r[1]) for r in results] == [(1.0, 1.0), (0.0, 1.0)]
    tool_turn = results[0][2][3]
    assert tool_turn == {"role": "tool", "name": "add", "tool_call_id": "call_0", "content": "5"}
    cb.before = [(0.0, 0.0), (0.0, 0.0)]
    with caplog.at_level("INFO"):
        cb.on_train_end(trainer, module)
    r = parse("sft_tools", "\n".join(rec.getMessage() for rec in caplog.records))
    assert (r.after, r.n, r.tool_use, r.paired[:2]) == (0.5, 2, (None, 1.0), (1, 0))


@pytest.mark.slow
def test_tool_demo_runs_both_stages_and_reports_the_figures(tmp_path):
    """The shipped sft_tools and grpo_tools recipes as the demo runs them (the model swapped for a tiny random one
    with a 1024-token context: its 400-token vocabulary spells the tool schemas in 500 tokens): both stages finish,
    GRPO starts from the SFT adapter, and the summary shows exact match with the paired standard error and the share
    of answers that used the tool, for each stage."""
    from tests.conftest import make_tiny_llama, make_tokenizer

    model = tmp_path / "tiny"
    make_tiny_llama(str(model), vocab_size=len(make_tokenizer(str(model))), max_position_embeddings=1024)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "lit_ft", "demo", "--stages", "sft_tools,grpo_tools", "--",
                          "--model.base.name_or_path", str(model), "--trainer.logger", "false",
                          "--data.max_length", "1024"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout[out.stdout.index("demo done in"):]
    for stage in ("sft_tools", "grpo_tools"):
        line = next(x for x in summary.splitlines() if x.strip().startswith(stage))
        assert "exact_match" in line and "on 32 held-out" in line and "paired standard error" in line, line
        assert "tool use 0." in line or "tool use 1." in line, line
    assert (tmp_path / "runs/sft_tools/latest/adapter").is_dir() and (tmp_path / "runs/grpo_tools/latest/adapter").is_dir()


def test_the_calculator_episodes_start_as_the_sft_rows_do(smollm2_dir):
    """On the bundled model's tokenizer: a held-out question's episode prompt (CalculatorEnvironment.reset rendered
    under render_tools hermes) is token for token the prompt of the same question's SFT row (data.tool_format
    hermes), and the row's trained text is what the hermes parser reads back as the calculator call."""
    from transformers import AutoTokenizer

    from lit_ft.data.recipes import resolve_source
    from lit_ft.data.templates import render_prompt, render_segments
    from lit_ft.online.calculator import CalculatorEnvironment
    from lit_ft.online.episodes import render
    from lit_ft.online.toolcalls import parse_hermes

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    row = json.loads(Path(resolve_source("demo:tools_val.jsonl")).read_text().splitlines()[0])
    env = CalculatorEnvironment()
    question = row["messages"][1]["content"]
    episode = render(tok, env.reset({"prompt": question, "answer": row["answer"]}), env.tools, True, "hermes")
    assert episode == render_prompt(row["messages"][:2], tok, "chat", None, tools=row["tools"], tool_format="hermes")
    assert row["tools"] == env.tools and "<tools>" in episode
    segments = render_segments(row["messages"], tok, "chat", None, tools=row["tools"], tool_format="hermes")
    call = [t for t, trained in segments if trained][0].removesuffix("<|im_end|>\n")
    assert parse_hermes(call) == ("", [{k: v for k, v in c.items() if k != "id"} for c in row["messages"][2]["tool_calls"]])
