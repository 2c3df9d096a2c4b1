"""`lit-ft judge`: score policy adapters on held-out prompts with a reward model as the judge.

    lit-ft judge --judge runs/judge_rm/latest/adapter --prompts heldout.jsonl --template plain \\
        --policy sft=runs/sft/latest/adapter --policy ppo=runs/ppo/latest/adapter --baseline sft

Each policy (`NAME=ADAPTER_DIR`, or `base` for the base model alone) samples one answer per prompt; the judge (an
exported reward adapter, ideally one no policy was trained against: trained on other pairs or with another seed)
scores each answer (`--judge` repeated, `NAME=DIR` each: several judges score the same answers); every policy is
compared with the baseline prompt by prompt: win rate and score difference with their paired standard errors, the
KL to the baseline on the policy's own answers, and the number of distinct answers (`lit_ft.online.judge`).
`--out FILE.json` keeps every answer and score. The policies along a run: `ExportAdapter(every_n_steps=N)`.

Prompts are read like `PromptDataModule`'s (`prompt`, `question`, `messages`, `instruction`, HH-RLHF pairs, ...),
the first `--n` of them, rendered with `--template` for the policies and `--judge_template` for the judge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_ft.errors import ConfigError


def _named(values: list[str], flag: str, bare, expected: str) -> dict[str, str | None]:
    """`NAME=ADAPTER_DIR` values of a repeated flag as {name: dir}; `bare(i, value)` -> (name, dir) for a value
    without `=` (None: refused with `expected`); a name given twice is refused."""
    out: dict[str, str | None] = {}
    for i, value in enumerate(values):
        name, sep, path = value.partition("=")
        if not sep:
            name, path = bare(i, value) or ("", "")
        if not name or not (path or path is None):
            raise ConfigError(f"{flag} {value!r}: expected {expected}")
        if name in out:
            raise ConfigError(f"{flag} {value!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def _policies(values: list[str]) -> dict[str, str | None]:
    return _named(values, "--policy", lambda i, v: ("base", None) if v == "base" else None,
                  "NAME=ADAPTER_DIR (or `base` for the base model alone)")


def _judges(values: list[str]) -> dict[str, str]:
    return _named(values, "--judge", lambda i, v: ("judge" if len(values) == 1 else f"judge{i + 1}", v),
                  "ADAPTER_DIR or NAME=ADAPTER_DIR")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lit-ft judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", action="append", required=True,
                        help="an exported reward adapter directory, or NAME=DIR; repeat for several judges")
    parser.add_argument("--policy", action="append", required=True, help="NAME=ADAPTER_DIR, or `base`; repeat")
    parser.add_argument("--baseline", default=None, help="the policy the others are compared with (default: the first)")
    parser.add_argument("--prompts", required=True, help="a prompt file (JSONL, JSON, CSV, Parquet)")
    parser.add_argument("--n", type=int, default=200, help="the first N prompts")
    parser.add_argument("--template", default="chat", choices=["chat", "plain", "alpaca"])
    parser.add_argument("--judge_template", default=None, choices=["chat", "plain", "alpaca"],
                        help="how the judge reads prompt + answer (default: --template)")
    parser.add_argument("--system_prompt", default=None)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (the KL is then not an estimate)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="base model (default: the first adapter's, else the bundled one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=None, help="write every answer and score here (JSON)")
    args = parser.parse_args(argv)
    policies, judges = _policies(args.policy), _judges(args.judge)
    baseline = args.baseline or next(iter(policies))
    if baseline not in policies:
        raise ConfigError(f"--baseline {baseline}: not one of the policies {list(policies)}")
    for key in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key}={getattr(args, key)}: expected an integer >= 1")
    for name, path in [*((f"--judge {k}", v) for k, v in judges.items()),
                       *((f"--policy {k}", v) for k, v in policies.items() if v)]:
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"{name}: {path} has no adapter_config.json (an exported adapter directory)")
    if args.out is not None:
        from lit_ft.train.outputs import check_output

        check_output(args.out, "--out", kind="file")
    run(args, policies, judges, baseline)


def run(args, policies: dict[str, str | None], judges: dict[str, str], baseline: str) -> None:
    import torch

    from lit_ft.data.hh import prompt_for
    from lit_ft.data.records import load_records
    from lit_ft.data.templates import render_pair, render_prompt
    from lit_ft.models import ModelSpec, load_base, load_tokenizer
    from lit_ft.models.adapters import check_adapter_base, trained_base
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.online.judge import BASE, judge_policies, report
    from lit_ft.online.scoring import RewardScorer

    records, _ = load_records(args.prompts, "prompt", setting="--prompts")
    records = records[: args.n]
    if not records:
        raise ConfigError(f"--prompts {args.prompts}: no prompts")
    adapters = {k: v for k, v in policies.items() if v}
    base = args.base if args.base is not None or not adapters else trained_base(next(iter(adapters.values())))
    spec = ModelSpec(name_or_path=base, dtype=args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_base(spec, "causal_lm", device)
    from peft import PeftModel

    for i, (name, path) in enumerate(adapters.items()):
        check_adapter_base(path, spec.identity(), f"--policy {name}")
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(path, adapter_name=name, is_trainable=False)
    if not adapters:  # the base alone: wrap it so that every policy runs through the same code
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=1, target_modules="all-linear"), adapter_name="unused")
    model.to(device).eval()
    with_tokenizer = [v for v in adapters.values() if (Path(v) / "tokenizer_config.json").is_file()]
    tok = load_tokenizer(with_tokenizer[0] if with_tokenizer else base)
    names = [BASE if v is None else k for k, v in policies.items()]
    baseline = BASE if policies[baseline] is None else baseline
    judge_template = args.judge_template or args.template
    prompts = [render_prompt(prompt_for(r, args.template), tok, args.template, args.system_prompt, r.get("input"))
               for r in records]

    def judge_text(i: int, response: str) -> str:
        p, a = render_pair(prompt_for(records[i], judge_template), response, tok, judge_template, args.system_prompt)
        return p + a

    scorers = {j: RewardScorer.from_pretrained(path, base=ModelSpec(name_or_path=base, dtype=args.dtype),
                                               device=device) for j, path in judges.items()}
    sampling = SamplingSpec(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                            engine="hf")
    results = judge_policies(model, tok, names, baseline, prompts, judge_text, scorers, sampling, args.batch_size,
                             args.seed)
    print(f"judges {judges}; {len(prompts)} prompts of {args.prompts}; sampling T={args.temperature} "
          f"top_p={args.top_p}, at most {args.max_new_tokens} tokens, seed {args.seed}", file=sys.stderr)
    print(report(results, baseline))
    if args.out is not None:
        Path(args.out).write_text(json.dumps({
            "judges": judges, "prompts": args.prompts, "baseline": baseline, "settings": vars(args),
            "policies": [{"name": r.name, "adapter": policies.get(r.name), "vs_baseline": r.vs_baseline,
                          "mean_score": {j: float(v.mean()) for j, v in r.scores.items()},
                          "mean_kl": float(r.kl.mean()), "mean_tokens": float(r.lengths.float().mean()),
                          "distinct": r.distinct,
                          "answers": [{"prompt": p, "response": t, "kl": float(k), "tokens": int(n),
                                       "scores": {j: float(v[i]) for j, v in r.scores.items()}}
                                      for i, (p, t, k, n) in enumerate(zip(prompts, r.responses, r.kl, r.lengths))]}
                         for r in results]}, indent=1))
