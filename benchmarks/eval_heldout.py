"""Greedy exact match of demo-task adapters on a large fresh held-out set, each compared prompt by prompt with the
first adapter (the paired change and its standard error, `lit_ft.callbacks.heldout.paired_change`).

    python benchmarks/eval_heldout.py --adapters runs/sft/latest/adapter runs/grpo/latest/adapter --n 1000 \
        --out benchmarks/results/heldout.json

The 200 prompts of `data/demo/prompts_val.jsonl` tell a gain of about 0.08 from noise (about 50 of 200 greedy answers
change in a short RL run, half each way); this set draws `--n` new problems with `lit_ft.data.tasks.make_problem` (seeded,
none of them a prompt of the demo's train or validation files) so that a smaller change can be measured. The prompts
are rendered as the demo's `template: chat` renders them (the tokenizer's chat template, one user turn after the
demo configs' empty system turn, `--system-prompt`) and decoded
greedily for 16 new tokens, as `SampleGenerations` does; the base is the bundled SmolLM2-135M-Instruct unless
`--base` names another.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_ft.callbacks.heldout import paired_change, score_prompts  # noqa: E402
from lit_ft.data.templates import render_prompt  # noqa: E402
from lit_ft.online.generation import SamplingSpec  # noqa: E402
from lit_ft.online.engine_ops import RolloutWeights  # noqa: E402
from lit_ft.data.tasks import answer_match, make_problem  # noqa: E402


def fresh_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs, distinct, none a prompt of the demo's train or validation files."""
    taken = {json.loads(line)["prompt"] for name in ("prompts_train.jsonl", "prompts_val.jsonl", "sft_train.jsonl",
                                                    "sft_val.jsonl")
             for line in (REPO / "data/demo" / name).read_text().splitlines() if line.strip()}
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        q, _, a = make_problem(rng)
        if q not in taken and q not in seen:
            seen.add(q)
            out.append((q, a))
    return out


def evaluate(base: str, adapter: str, problems, batch: int, device: str = "cpu",
             system_prompt: str | None = "") -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer_config.json").exists() else base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base_model, adapter).eval().to(device)
    spec = SamplingSpec(max_new_tokens=16, do_sample=False)
    rows = [(render_prompt([{"role": "user", "content": q}], tok, "chat", system_prompt), a) for q, a in problems]
    with RolloutWeights(model, model.active_adapter).swapped_in():  # as SampleGenerations(merged=True)
        return [r[3] for r in score_prompts(model, tok, rows, spec, answer_match, batch, device)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter directories; the first is the baseline")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--base", default=None, help="base model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--system-prompt", default="",
                   help="data.system_prompt the adapters were trained with ('' as the demo configs; 'none' = the "
                        "template's default system turn, as the earlier configs and the 2026-12-02_heldout1000 results)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.base is None:
        from lit_ft.models.default import default_model_dir

        args.base = default_model_dir()
    problems = fresh_problems(args.n, args.seed)
    results, first = [], None
    for adapter in args.adapters:
        t0 = time.perf_counter()
        scores = evaluate(args.base, adapter, problems, args.batch, args.device,
                          None if args.system_prompt == "none" else args.system_prompt)
        row = {"adapter": adapter, "n": len(scores), "exact_match": sum(scores) / len(scores),
               "seconds": round(time.perf_counter() - t0, 1)}
        if first is None:
            first = scores
        else:
            better, worse, change, se = paired_change(first, scores)
            row.update(better=better, worse=worse, change=change, standard_error=se)
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "seed": args.seed, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
