"""The memory plan against the stored GPU peaks, on the CPU: no GPU, no weights.

    python benchmarks/plan_vs_results.py [--results benchmarks/results] [--json out.json]

For every stored benchmark result with a measured peak (`torch.cuda.max_memory_allocated`, the `peak_gb` of
bench_sft/bench_reward/bench_dpo/bench_ppo's JSON, and the `[end] ... peak CUDA memory` lines of the bundled
configs' logs), this builds the settings the bench script used for that variant (the workload's shapes written
as a Llama `config.json` into a temporary directory: the planner reads the config only), plans them with
`lit_ft.plan.estimate_settings` for CUDA, and prints workload, variant, planned peak, measured peak and
measured / planned, against the 15% target. The settings mirror the bench scripts (benchmarks/bench_*.py):
precision, gradient checkpointing, loss chunk, LoRA spec, roles, minibatch, rows; their random rows are full
length with an all-ones attention mask (no padding), which the plan is told (`RowStats`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 0.15
GIB = 2**30

# every stored result file the table covers; variants without a peak (errors) and peers (hf, trl) are skipped
SOURCES = ["2026-12-02_w1.json", "w1.json", "w1b.json", "w3.json", "w4.json", "2026-12-02_d1.json",
           "w5.json", "2026-12-01_rollout_1b_w5.json", "2026-12-02_w5_grpo.json", "w5_8b_gc.json",
           "2026-12-02_w5_8b_grpo.json"]
BUNDLED = {"configs/grpo.yaml": ["grpo_s0.log", "grpo_s1.log", "grpo_s2.log"],
           "configs/dpo.yaml": ["dpo.log", "dpo_b05.log", "dpo_rpo1.log", "dpo_rpo1_b05.log", "dpo_rpo1_lr.log"]}


def write_config(w: dict, seq: int, where: Path) -> str:
    """The workload's Llama config (as bench_sft.build_random_model writes it) in its own directory."""
    d = where / f"{w['name']}_{w['hidden']}_{w['layers']}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=w["hidden"],
               num_hidden_layers=w["layers"], num_attention_heads=w["heads"], num_key_value_heads=w["kv_heads"],
               intermediate_size=w["intermediate"], vocab_size=w["vocab"], tie_word_embeddings=w["tied"],
               max_position_embeddings=max(4096, seq), rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, torch_dtype="bfloat16")
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def mods_of(variant: str) -> tuple[str, set[str]]:
    impl, *mods = variant.split("+")
    return impl, set(mods)


def int_mod(mods: set[str], prefix: str, default: int) -> int:
    return next((int(m[len(prefix):]) for m in mods if re.fullmatch(prefix + r"\d+", m)), default)


def full_rows(seq: int, rows: int, labels: int):
    """Random full-length rows with an all-ones mask, as the bench scripts feed them."""
    from lit_ft.plan.rows import RowStats

    return RowStats(longest=seq, eval_longest=seq, label_counts=(labels,) * rows, padded=False,
                    note=f"bench rows: every row {seq} tokens, no padding")


def settings_for(kind: str, w: dict, r: dict, where: Path):
    """The `Settings` the bench script built for result `r` of workload `w` (None: not a lit_ft variant)."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.train.optim import OptimSpec
    from lit_ft.plan import Settings

    impl, mods = mods_of(r["variant"])
    if impl not in ("lit", "grpo"):
        return None
    lora = LoraSpec(**w["lora"])
    quant = w.get("quant", "none")
    if kind in ("sft", "reward", "dpo"):
        gc = r.get("gradient_checkpointing", ("gc" in mods or w.get("gc", False)) and "nogc" not in mods)
        seq = w.get("seq") or w["prompt"] + w["response"]
        base = ModelSpec(name_or_path=write_config(w, seq, where), dtype="bfloat16", attn_implementation="sdpa",
                         quantization=quant, double_quant=True, compute_dtype="bfloat16", gradient_checkpointing=gc,
                         liger_kernel="liger" in mods)
        precision = r.get("precision") or ("bf16-mixed" if "mixed" in mods or quant != "none" else "bf16-true")
        chunk = int(r.get("loss_chunk_size") or int_mod(mods, "c", 4096))
        if kind == "sft":
            rows = w["batch"]
            return Settings("sft", base, lora, OptimSpec(lr=w["lr"]), rows, seq, precision=precision,
                            loss_chunk_size=chunk, data=full_rows(seq, rows, seq - 1), compile="compile" in mods)
        from lit_ft.stages.dpo import DPOSpec

        pairs = w["pairs"]
        labels = (w["response"] if kind == "dpo" else seq - 1)
        dpo = DPOSpec(precompute_ref="precompute" in mods) if kind == "dpo" else None
        return Settings(kind, base, lora, OptimSpec(lr=w["lr"]), pairs, seq, precision=precision, dpo=dpo,
                        data=full_rows(seq, 2 * pairs, labels), compile="compile" in mods)
    # PPO / GRPO (bench_ppo.py): a new LoRA policy, the reward adapter, PPO's value adapter
    from lit_ft.stages.grpo_spec import GRPOSpec
    from lit_ft.stages.ppo_spec import PPOSpec

    seq = w["prompt_len"] + w["new_tokens"]
    engine = r.get("engine") or "hf"  # w5.json's `lit` predates the decode engine: hf generate
    sampling = SamplingSpec(max_new_tokens=w["new_tokens"], do_sample=True, engine=engine,
                            merged=bool(r.get("merged")))
    cfg = write_config(w, seq, where)
    base = ModelSpec(name_or_path=cfg, dtype="bfloat16", attn_implementation="sdpa", quantization=quant,
                     double_quant=True, compute_dtype="bfloat16",
                     gradient_checkpointing=bool(r["gradient_checkpointing"]))
    precision = r["precision"]
    prompts = w["prompts"] if impl == "lit" else int_mod(mods, "p", w["prompts"])
    reward = str(Path(cfg) / "reward_adapter")  # absent: the plan takes it as model.lora, as bench_ppo builds it
    data = full_rows(w["prompt_len"], prompts, 0)
    if impl == "lit":
        ppo = PPOSpec(ppo_epochs=r["ppo_epochs"], mini_batch_size=r["mini_batch_size"])
        return Settings("ppo", base, lora, OptimSpec(), prompts, w["prompt_len"], precision=precision,
                        sampling=sampling, ppo=ppo, value_model="adapter", reward_adapter=reward, data=data,
                        head_dtype="float32" if r.get("fp32_heads_workaround") else None)
    grpo = GRPOSpec(samples_per_prompt=r["samples_per_prompt"], mini_batch_size=r["mini_batch_size"],
                    num_iterations=r["num_iterations"])
    return Settings("grpo", base, lora, OptimSpec(), prompts, w["prompt_len"], precision=precision,
                    sampling=sampling, grpo=grpo, reward_adapter=reward, data=data,
                    head_dtype="float32" if r.get("fp32_heads_workaround") else None)


def kind_of(w: dict) -> str:
    if "pairs" in w:
        return "dpo" if "response" in w else "reward"
    return "sft" if "seq" in w else "ppo"


def stored_rows(results: Path, where: Path) -> list[dict]:
    from lit_ft.plan import estimate_settings

    out = []
    for name in SOURCES:
        data = json.loads((results / name).read_text())
        w = data["workload"]
        for r in data["results"]:
            if "peak_gb" not in r:
                continue
            s = settings_for(kind_of(w), w, r, where)
            if s is None:
                continue
            plan = estimate_settings(s, budget=None, advise=False)
            out.append(dict(source=name, workload=w["name"], variant=r["variant"], stage=s.stage,
                            planned=plan.peak, measured=int(r["peak_gb"] * 1e9),
                            components={c: b for c, b, _ in plan.rows}))
    return out


def bundled_rows(results: Path) -> list[dict]:
    """The shipped configs as they ran on the GPU (`--trainer.accelerator gpu`: dtype auto = bf16 on CUDA), planned
    from their CLI parse (the demo rows, tokenized as the DataModule does); the measured peak is the largest
    `[end] ... peak CUDA memory` of the runs of that config (a whole fit: validation and callbacks included)."""
    from lit_ft.plan import plan_from_cli

    out = []
    for config, logs in BUNDLED.items():
        peaks = []
        for log in logs:
            text = (results / "2026-12-02_bundled" / log).read_text()
            peaks += [float(x) for x in re.findall(r"\[end\].*peak CUDA memory ([0-9.]+) GiB", text)]
        plan = plan_from_cli(["--config", config, "--trainer.accelerator", "cpu"], budget=None, target="cuda")
        out.append(dict(source="2026-12-02_bundled/" + ",".join(Path(x).stem for x in logs), workload=Path(config).name,
                        variant=f"bundled ({len(peaks)} runs, {min(peaks):.2f}-{max(peaks):.2f} GiB)",
                        stage=plan.settings.stage, planned=plan.peak, measured=int(max(peaks) * GIB),
                        rows=plan.settings.data.note if plan.settings.data else "max_length",
                        components={c: b for c, b, _ in plan.rows}))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| workload | variant | planned GiB | measured GiB | measured / planned | within 15% | measured in |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for x in rows:
        ratio = x["measured"] / x["planned"]
        ok = "met" if abs(ratio - 1) <= TARGET else "not met"
        lines.append(f"| {x['workload']} | {x['variant']} | {x['planned'] / GIB:.2f} | {x['measured'] / GIB:.2f} | "
                     f"{ratio:.2f} | {ok} | {x['source']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--json", default=None, help="also write the rows (with the planned components) here")
    p.add_argument("--no-bundled", action="store_true", help="skip the shipped configs (they need the bundled model)")
    args = p.parse_args(argv)
    results = Path(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        rows = stored_rows(results, Path(tmp))
    if not args.no_bundled:
        rows += bundled_rows(results)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
