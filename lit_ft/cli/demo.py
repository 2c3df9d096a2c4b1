"""`lit-ft demo`: the pipeline on the shipped demo data, from any directory (it writes `runs/` there).

    lit-ft demo                          # SFT -> GRPO (verifiable reward), each printing its before/after task metric
    lit-ft demo --stages sft,reward,ppo  # the RLHF pipeline: SFT -> reward model -> PPO (about 3x longer)
    lit-ft demo --stages sft             # one stage
    lit-ft demo --stages sft_tools,grpo_tools   # tool use: SFT on calculator calls, then multi-turn GRPO against it
    lit-ft demo -- --trainer.accelerator cpu   # settings after `--` go to every stage

Each stage is `lit-ft fit --config <stage>` in its own process; GRPO and PPO start from `runs/sft/latest/adapter`,
PPO scores with `runs/reward/latest/adapter`. At the end a summary gives each stage's wall time and its
before -> after metric with the evaluation-set size and its standard error, so a gain can be told from the noise
of the evaluation set: the paired one (the same prompts before and after, `heldout.paired_change`) where the
stage printed it, else the binomial one of each side. The tool stages (`sft_tools`, `grpo_tools`: the calculator of
`lit_ft.CalculatorEnvironment`, played by `lit_ft.HeldOutEpisodes`) add the share of held-out answers that called
the tool, before -> after.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from lit_ft.errors import ConfigError

STAGES = ("sft", "reward", "ppo", "grpo", "dpo", "sft_tools", "grpo_tools")
DEFAULT_STAGES = ("sft", "grpo")  # BENCHMARKS.md "The 10-minute CPU demo": why GRPO, not RM -> PPO, by default

# What SampleGenerations prints (`[before training] exact_match on 200 held-out prompts: 0.460`) and the reward
# stage's validation line (`[validation (sanity check, ...) step 0] ... val/accuracy 0.5200 ...`).
_GENERATED = re.compile(r"\[(before|after) training\] (\S+) on (\d+) held-out prompts: ([0-9.]+)")
_PAIRED = re.compile(r"\(paired over (\d+) prompts: (\d+) better, (\d+) worse; change ([-+0-9.]+), "
                     r"standard error ([0-9.]+)\)")
_TOOL_USE = re.compile(r"\[(before|after) training\] tool use on (\d+) held-out prompts: ([0-9.]+)")
_VALIDATION = re.compile(r"\[validation( \(sanity check, (\d+) batches\))? step \d+\].*?\bval/accuracy ([0-9.]+)")


@dataclass
class Result:
    """One stage's task metric before and after training, on `n` held-out examples."""

    stage: str
    metric: str
    before: float | None
    after: float | None
    n: int | None
    n_before: int | None = None
    seconds: float = 0.0
    paired: tuple[int, int, float, float] | None = None  # (better, worse, change, its standard error): same prompts
    tool_use: tuple[float | None, float | None] | None = None  # the share of answers that called a tool, before/after

    def line(self) -> str:
        head = f"{self.stage:<7} {clock(self.seconds):>6}  "
        if self.before is None or self.after is None:
            return head + f"{self.metric} {fmt(self.after)}" + (f" on {self.n}" if self.n else "")
        text = f"{self.metric} {self.before:.3f} -> {self.after:.3f}"
        if self.paired is not None:
            better, worse, change, se = self.paired
            text += f" on {self.n} held-out ({better} better, {worse} worse; paired standard error {se:.3f}"
            text += f"; the change is {change / se:+.1f}x it)" if se > 0 else ")"
        elif self.n:
            se_a, se_b = binomial_se(self.after, self.n), binomial_se(self.before, self.n_before or self.n)
            where = f"{self.n} held-out" if not self.n_before or self.n_before == self.n \
                else f"{self.n_before} then {self.n} held-out"
            text += f" on {where} (standard error {se_b:.3f} / {se_a:.3f}"
            diff = math.hypot(se_a, se_b)
            text += f"; the gain is {(self.after - self.before) / diff:.1f}x its standard error)" if diff > 0 else ")"
        if self.tool_use is not None:
            text += f"; tool use {fmt(self.tool_use[0])} -> {fmt(self.tool_use[1])}"
        return head + text


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion `p` measured on `n` independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def parse(stage: str, text: str, seconds: float = 0.0) -> Result:
    """The before/after metric a stage printed: SampleGenerations' lines, else (the reward model) the first and
    last `val/accuracy` of its validation lines (the first is the sanity check's, on part of the held-out pairs)."""
    found = {m.group(1): m for m in _GENERATED.finditer(text)}
    if found:
        b, a = found.get("before"), found.get("after")
        name = (a or b).group(2)
        p = _PAIRED.search(text)
        paired = (int(p.group(2)), int(p.group(3)), float(p.group(4)), float(p.group(5))) if p else None
        tools = {m.group(1): float(m.group(3)) for m in _TOOL_USE.finditer(text)}
        return Result(stage, name, float(b.group(4)) if b else None, float(a.group(4)) if a else None,
                      int((a or b).group(3)), int(b.group(3)) if b else None, seconds, paired,
                      (tools.get("before"), tools.get("after")) if tools else None)
    vals = [(m.group(1) is not None, float(m.group(3))) for m in _VALIDATION.finditer(text)]
    if vals:
        before = vals[0][1] if vals[0][0] and len(vals) > 1 else None
        return Result(stage, "val/accuracy", before, vals[-1][1], None, None, seconds)
    return Result(stage, "(no metric printed)", None, None, None, None, seconds)


def run_stage(stage: str, extra: list[str]) -> tuple[int, str, float]:
    """`lit-ft fit --config <stage>` in its own process; its output is passed through as it comes and kept."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lit_ft", "fit", "--config", stage, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kept = bytearray()
    while chunk := os.read(proc.stdout.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        kept += chunk
    code = proc.wait()
    return code, kept.decode("utf-8", "replace"), time.perf_counter() - start


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="lit-ft demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated, in order, of {', '.join(STAGES)} (default: {','.join(DEFAULT_STAGES)})")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages: {unknown or args.stages!r}: expected some of {', '.join(STAGES)}")
    results, total = [], time.perf_counter()
    for stage in stages:
        print(f"\n=== lit-ft fit --config {stage} {' '.join(extra)}".rstrip(), flush=True)
        code, text, seconds = run_stage(stage, extra)
        if code != 0:
            print(f"demo: stage {stage} failed (exit code {code})", file=sys.stderr)
            raise SystemExit(code)
        results.append(parse(stage, text, seconds))
    print(f"\ndemo done in {clock(time.perf_counter() - total)}:")
    for r in results:
        print("  " + r.line())
    last = stages[-1] if stages[-1] != "reward" else "sft"
    if last.endswith("_tools"):  # `lit-ft chat` has no tools: the episodes are where the calls are executed
        print(f"the adapters are in runs/<stage>/latest/adapter (the tool stages' episodes: README \"Tool use\")")
        return
    print(f"the adapters are in runs/<stage>/latest/adapter; try\n"
          f"  lit-ft chat --adapter runs/{last}/latest/adapter --prompt 'What is 12 + 30?'")
