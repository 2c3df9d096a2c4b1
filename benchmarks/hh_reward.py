"""Reward models on HH-RLHF harmless pairs: lit_ft's RewardModule against TRL's RewardTrainer at the same settings,
several seeds each, held-out pair accuracy on one split both systems score the same way.

    python benchmarks/hh_reward.py split --src ../shared/data/hh_harmless/train.jsonl --out .hh     # once, here
    python benchmarks/hh_reward.py run --data .hh --out $OUT/hh --jobs trl:0,trl:1,lit:0,lit+fp32:0   # on the GPU
    python benchmarks/hh_reward.py rlhf --data .hh --out $OUT/rlhf --minutes 4 [--phases models,stages,judge]
    python benchmarks/hh_reward.py rlhf --data .hh --out $OUT/rlhf --phases models,stages --only sft,dpo,kto   # KTO

Settings (what issue 29 measured): SmolLM2-135M-Instruct (the bundled model as lit_ft converts it), LoRA r16 alpha 32
dropout 0 on every projection + the score head, batch 8 pairs, lr 2e-4 cosine with 2 warm-up steps, 1 epoch, max 512
tokens, bf16 autocast, gradient checkpointing (TRL's default), no reward centering.

The split: the 2,000 pairs shuffled with seed 0, the last 312 held out (the size of the held-out set the data's
README keeps elsewhere); the held-out file keeps the pairs whose chosen and rejected texts are at most 512 tokens
(TRL drops longer pairs from any dataset it is given, lit_ft would cut their prompts: on this file neither happens),
so both systems score exactly the same 2 x N texts. Training pairs over 512 tokens are TRL's to drop and lit_ft's to
cut (its default `overlong: truncate_prompt`), as each does for a user.

A job is SYSTEM[+MOD...]:SEED. SYSTEM `trl` (its documented Python API, its defaults otherwise: float32 weights under
bf16 autocast, dropout disabled) or `lit` (the `lit-ft fit --config reward` command with the settings above,
`--trainer.precision bf16-mixed`, the base's dtype `auto`: bfloat16 on the GPU). lit modifiers: `fp32` (the base in
float32, as TRL holds it), `chat` (template chat: HH turns through SmolLM2's chat template), `bf16head` (the score
head kept in the base's bfloat16, as lit_ft did before 2026-12-06), `drop` (overlong pairs dropped, as TRL does),
`mem<MiB>` / `memauto` (checkpointing not forced on: `--memory <MiB>MiB` / the default `--memory auto` plans the fit
and chooses the settings), `compile` (`--model.compile true`: each decoder layer through torch.compile), `liger`
(`--model.base.liger_kernel true`: Liger's fused RMSNorm, SwiGLU and RoPE kernels), `pad`
(padded batches: lit_ft runs here pack each batch's sequences padding-free, as configs/recipes/hh_rlhf/reward.yaml
does since 2026-12-07: the same pairs a step and the same loss, 43% of the padded tokens on this file). Jobs run at
once, each in its own process (a 135M model leaves the GPU mostly idle: wall times of concurrent jobs are not speed
figures); `--sequential` runs them one after the other, for speed figures
(`fit_s`: the training loop alone, model loading and tokenization excluded on both sides).

`rlhf`: SFT -> reward model -> PPO / GRPO / DPO with configs/recipes/hh_rlhf/, judged by reward models the policies
never saw (see the RLHF section below).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(batch=8, lr=2e-4, warmup=2, r=16, alpha=32, max_length=512, eval_batch=16)


def split(src: str, out: str, test: int = 312, seed: int = 0) -> None:
    sys.path.insert(0, str(ROOT))
    from lit_ft.models import default_model_dir, load_tokenizer

    rows = [json.loads(line) for line in open(src)]
    random.Random(seed).shuffle(rows)
    train, held = rows[:-test], rows[-test:]
    tok = load_tokenizer(default_model_dir())
    fits = [r for r in held if max(len(tok(r[k] + tok.eos_token)["input_ids"]) for k in ("chosen", "rejected"))
            <= SETTINGS["max_length"]]
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test_all", held), ("test", fits)):
        with open(Path(out) / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"train {len(train)}, held out {len(held)}, of which {len(fits)} fit {SETTINGS['max_length']} tokens")


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(data: Path, out: Path, seed: int) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    sys.path.insert(0, str(ROOT))
    from lit_ft.models import default_model_dir

    files = {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}
    ds = load_dataset("json", data_files=files)
    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=SETTINGS["batch"],
        per_device_eval_batch_size=SETTINGS["eval_batch"], learning_rate=SETTINGS["lr"], lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup"], num_train_epochs=1, max_length=SETTINGS["max_length"], seed=seed,
        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),  # the CPU: a dry run of the script
        logging_steps=25, report_to="none", save_strategy="no", eval_strategy="no")
    peft = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="SEQ_CLS", modules_to_save=["score"])
    trainer = RewardTrainer(model=default_model_dir(), args=args, train_dataset=ds["train"], peft_config=peft)
    reset_peak()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    metrics = trainer.evaluate(eval_dataset=ds["test"])
    return {"accuracy": metrics["eval_accuracy"], "train_s": seconds, "fit_s": seconds,
            "peak_gib": peak_gib(), "eval_pairs": len(ds["test"]),
            "train_pairs_used": len(trainer.train_dataset)}


# ------------------------------------------------------------------------------------------------ lit_ft


def lit_args(data: Path, out: Path, seed: int, mods: list[str]) -> list[str]:
    s = SETTINGS
    args = ["fit", "--config", "reward", "--seed_everything", str(seed),
            "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "test.jsonl"),
            "--data.template", "chat" if "chat" in mods else "plain", "--data.group_field", "null",
            "--data.max_length", str(s["max_length"]), "--data.batch_size", str(s["batch"]),
            "--data.eval_batch_size", str(s["eval_batch"]),
            "--data.overlong", "drop" if "drop" in mods else "truncate_prompt",
            "--data.packing", "false" if "pad" in mods else "true",
            "--model.lora.r", str(s["r"]), "--model.lora.alpha", str(s["alpha"]), "--model.lora.dropout", "0",
            "--model.optim.lr", str(s["lr"]), "--model.optim.warmup_steps", str(s["warmup"]),
            "--model.optim.scheduler", "cosine", "--model.center_coef", "0",
            *([] if any(m.startswith("mem") for m in mods) else ["--model.base.gradient_checkpointing", "true"]),
            *[a for m in mods if m.startswith("mem") and m != "memauto" for a in ("--memory", f"{m[3:]}MiB")],
            *(["--model.compile", "true"] if "compile" in mods else []),
            *(["--model.base.liger_kernel", "true"] if "liger" in mods else []),
            "--trainer.callbacks+=__main__.FitClock",
            "--model.base.dtype", "float32" if "fp32" in mods else "auto",
            "--trainer.precision", os.environ.get("HH_PRECISION", "bf16-mixed"), "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
            "--trainer.val_check_interval", "1.0", "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
            "--trainer.default_root_dir", str(out)]
    return args


def run_lit(data: Path, out: Path, seed: int, mods: list[str]) -> dict:
    import csv

    sys.path.insert(0, str(ROOT))
    if "bf16head" in mods:  # the head as it was: in the base's dtype
        import lit_ft.models.build as build

        build.fp32_head = lambda model: None
    from lit_ft.cli.app import main

    reset_peak()
    t0 = time.perf_counter()
    try:
        main(lit_args(data, out, seed, mods))
    except SystemExit as e:
        if e.code:
            raise
    seconds = time.perf_counter() - t0
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    acc = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    return {"accuracy": acc[-1], "train_s": seconds, "fit_s": FitClock.seconds, "peak_gib": peak_gib()}


try:
    import lightning as _L

    class FitClock(_L.Callback):
        """The training loop's wall time (first batch to the end of fit), validation excluded as TRL's `fit_s`
        excludes its `evaluate()`, as `fit_s`."""

        seconds = float("nan")

        def on_train_start(self, trainer, pl_module):
            reset_peak()
            FitClock.t0, FitClock.validating = time.perf_counter(), 0.0

        def on_validation_start(self, trainer, pl_module):
            FitClock.v0 = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and hasattr(FitClock, "t0"):
                FitClock.validating += time.perf_counter() - FitClock.v0

        def on_train_end(self, trainer, pl_module):
            FitClock.seconds = time.perf_counter() - FitClock.t0 - FitClock.validating
except ImportError:  # `split` needs no lightning
    pass


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# ------------------------------------------------------------------------------------------------ RLHF
#
# The pipeline of configs/recipes/hh_rlhf/ (the recipes as a user runs them, with the paths of this split), in three
# phases a GPU call each can hold:
#   models: SFT on the chosen side of the training pairs; the proxy reward model (seed 0) the online stages train
#           against; two judges the policies never see: the same recipe with seed 1, and one trained on the
#           HELD-OUT pairs (other data, the preferences of the very prompts judged);
#   stages: PPO (the recipe), PPO with last session's looser KL (init 0.05, target 6), GRPO and DPO, side by side
#           for the same wall time, each writing its policy along the run (ExportAdapter every_n_steps);
#   judge:  `lit-ft judge` of the SFT policy, every policy along every run and the final ones, by both judges, on
#           the held-out prompts: the judged score against KL over training.

STAGES = {  # name: (stage recipe, extra flags, optimizer steps between the policies written along the run)
    "ppo": ("ppo", [], 100),  # 4 optimizer steps a rollout: every 25 rollouts
    "ppo_loose": ("ppo", ["--model.ppo.init_kl_coef", "0.05", "--model.ppo.target", "6.0"], 100),
    "grpo": ("grpo", [], 20),  # one optimizer step a rollout
    "dpo": ("dpo", [], 50),
    "kto": ("kto", [], 50),  # the pairs read unpaired (16 examples = 8 pairs a step, as DPO's batch)
}


def common(out: Path, minutes: float | None = None) -> list[str]:
    args = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", ".", "--trainer.default_root_dir", str(out)]
    if minutes:
        args += ["--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}"]
    if os.environ.get("HH_BASE"):  # a dry run on another base (the tests' tiny model)
        args += ["--model.base.name_or_path", os.environ["HH_BASE"]]
    return args


def recipe(stage: str, name: str | None = None) -> list[str]:
    return ["fit", "--config", stage, "--config", f"recipes/hh_rlhf/{name or stage}"]


def sft_args(data: Path, out: Path) -> list[str]:
    """SFT on the chosen side of the training pairs: the policy every RLHF stage starts from."""
    return [*recipe("sft"), "--data.train_file", str(data / "train.jsonl"), *common(out)]


def model_jobs(data: Path, out: Path) -> dict[str, list[str]]:
    rm = [*recipe("reward"), "--data.train_file", str(data / "train.jsonl"), "--data.val_file",
          str(data / "test.jsonl")]
    return {"sft": sft_args(data, out / "sft"),
            "proxy": [*rm, "--seed_everything", "0", *common(out / "proxy")],
            "judge_seed1": [*rm, "--seed_everything", "1", *common(out / "judge_seed1")],
            "judge_heldout": [*recipe("reward"), "--data.train_file", str(data / "test_all.jsonl"),
                              "--trainer.max_epochs", "2", *common(out / "judge_heldout")]}


def stage_jobs(data: Path, out: Path, minutes: float, only: list[str] | None = None) -> dict[str, list[str]]:
    sft, proxy = out / "sft" / "latest" / "adapter", out / "proxy" / "latest" / "adapter"
    jobs = {}
    for name, (stage, extra, every) in STAGES.items():
        if only and name not in only:
            continue
        offline = stage in ("dpo", "kto")
        files = ["--data.train_file", str(data / "train.jsonl")]
        if stage != "grpo":
            files += ["--data.val_file", str(data / ("test.jsonl" if offline else "test_all.jsonl"))]
        adapters = ["--model.sft_adapter", str(sft)] + ([] if offline else ["--model.reward_adapter", str(proxy)])
        snapshots = ["--trainer.callbacks+=lit_ft.ExportAdapter", "--trainer.callbacks.dirpath", "policy",
                     "--trainer.callbacks.every_n_steps", str(every)]
        jobs[name] = [*recipe(stage), *files, *adapters, *extra, *snapshots, *common(out / name, minutes)]
    return jobs


def run_jobs(jobs: dict[str, list[str]], out: Path) -> None:
    """Each job a `lit-ft` process of its own, all at once (a 135M model leaves the GPU mostly idle)."""
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, args in jobs.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "lit_ft", *args], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=ROOT), time.perf_counter())
    for name, (p, t0) in procs.items():
        print(f"{name}: exit {p.wait()} after {time.perf_counter() - t0:.0f} s", flush=True)


def judge_policies(data: Path, out: Path, n: int) -> None:
    """The SFT policy, every policy written along each run and each final one, judged by both judges."""
    policies = [f"sft={out / 'sft' / 'latest' / 'adapter'}"]
    for name in STAGES:
        run = out / name / "latest"
        for step in sorted((run / "policy_steps").glob("step_*")):
            policies.append(f"{name}@{int(step.name.split('_')[1])}={step}")
        if (run / "adapter").is_dir():
            policies.append(f"{name}={run / 'adapter'}")
    args = ["judge", "--judge", f"seed1={out / 'judge_seed1' / 'latest' / 'adapter'}", "--judge",
            f"heldout={out / 'judge_heldout' / 'latest' / 'adapter'}", "--prompts", str(data / "test_all.jsonl"),
            "--n", str(n), "--template", "chat", "--system_prompt", "", "--max_new_tokens", "64", "--batch_size", "64",
            "--baseline", "sft", "--out", str(out / "judged.json")]
    if os.environ.get("HH_BASE"):
        args += ["--base", os.environ["HH_BASE"]]
    for policy in policies:
        args += ["--policy", policy]
    subprocess.run([sys.executable, "-m", "lit_ft", *args], cwd=ROOT, check=True)


def run_rlhf(data: Path, out: Path, phases: list[str], minutes: float, n: int, only: list[str] | None = None) -> None:
    if "models" in phases:
        run_jobs({k: v for k, v in model_jobs(data, out).items() if not only or k in only}, out)
    if "stages" in phases:
        run_jobs(stage_jobs(data, out, minutes, only), out)
    if "judge" in phases:
        judge_policies(data, out, n)


# ------------------------------------------------------------------------------------------------ driver


def one(job: str, data: Path, out: Path) -> None:
    system, seed = job.rsplit(":", 1)
    name, *mods = system.split("+")
    target = out / job.replace(":", "_s").replace("+", "_")
    target.mkdir(parents=True, exist_ok=True)
    if name == "sft":
        from lit_ft.cli.app import main

        t0 = time.perf_counter()
        main(sft_args(data, target))
        result = {"accuracy": float("nan"), "train_s": time.perf_counter() - t0, "peak_gib": peak_gib()}
    elif name == "trl":
        result = run_trl(data, target, int(seed))
    else:
        result = run_lit(data, target, int(seed), mods)
    result.update(job=job)
    (target / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def run_all(jobs: list[str], data: Path, out: Path, sequential: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for job in jobs:
        log = open(out / f"{job.replace(':', '_s').replace('+', '_')}.log", "w")
        procs.append((job, subprocess.Popen([sys.executable, __file__, "one", job, "--data", str(data), "--out",
                                             str(out)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)))
        if sequential:
            procs[-1][1].wait()
    for job, p in procs:
        p.wait()
        print(f"{job}: exit {p.returncode}", flush=True)
    summarize(out)


def summarize(out: Path) -> None:
    import statistics

    results = [json.loads(f.read_text()) for f in sorted(out.rglob("result.json"))]
    by = {}
    for r in results:
        by.setdefault(r["job"].rsplit(":", 1)[0], []).append(r)
    for system, rs in sorted(by.items()):
        accs = [r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"{system:16s} seeds {len(accs)}  accuracy " + " / ".join(f"{a:.3f}" for a in accs)
              + f"  mean {statistics.mean(accs):.3f} sd {sd:.3f}"
              + f"  train {statistics.mean(r['train_s'] for r in rs):.0f} s"
              + f"  fit {statistics.mean(r.get('fit_s', float('nan')) for r in rs):.1f} s"
              + f"  peak {max(r['peak_gib'] for r in rs):.1f} GiB")
    (out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["split", "run", "one", "summary", "rlhf"])
    parser.add_argument("--phases", default="models,stages,judge", help="rlhf: which of models, stages, judge")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--src", default="../shared/data/hh_harmless/train.jsonl")
    parser.add_argument("--data", default=".hh")
    parser.add_argument("--out", default="hh_runs")
    parser.add_argument("--jobs", default="trl:0,lit:0")
    parser.add_argument("--sequential", action="store_true", help="run: one job after the other (speed figures)")
    parser.add_argument("--minutes", type=float, default=5.0, help="rlhf: training time of each stage")
    parser.add_argument("--n", type=int, default=312, help="rlhf: held-out prompts judged")
    parser.add_argument("--only", default=None, help="rlhf: the models and stages to run (e.g. sft,dpo,kto)")
    a = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.mode == "split":
        split(a.src, a.data)
    elif a.mode == "one":
        one(a.job, Path(a.data).resolve(), Path(a.out).resolve())
    elif a.mode == "run":
        run_all(a.jobs.split(","), Path(a.data).resolve(), Path(a.out).resolve(), a.sequential)
    elif a.mode == "rlhf":
        run_rlhf(Path(a.data).resolve(), Path(a.out).resolve(), a.phases.split(","), a.minutes, a.n,
                 a.only.split(",") if a.only else None)
    else:
        summarize(Path(a.out).resolve())
