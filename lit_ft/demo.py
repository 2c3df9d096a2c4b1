"""`lit-ft demo`: the whole pipeline on the shipped demo data, from any directory (it writes `runs/` there).

    lit-ft demo                          # SFT -> reward model -> PPO, each printing its before/after task metric
    lit-ft demo --stages sft             # one stage
    lit-ft demo -- --trainer.accelerator cpu   # settings after `--` go to every stage

Each stage is `lit-ft fit --config <stage>` in its own process; PPO starts from `runs/sft/latest/adapter` and
scores with `runs/reward/latest/adapter`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from lit_ft.errors import ConfigError

STAGES = ("sft", "reward", "ppo")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="lit-ft demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order (default: all)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages: {unknown or args.stages!r}: expected some of {', '.join(STAGES)}")
    for stage in stages:
        print(f"\n=== lit-ft fit --config {stage} {' '.join(extra)}".rstrip(), flush=True)
        code = subprocess.run([sys.executable, "-m", "lit_ft", "fit", "--config", stage, *extra]).returncode
        if code != 0:
            print(f"demo: stage {stage} failed (exit code {code})", file=sys.stderr)
            raise SystemExit(code)
    print("\ndemo done: the adapters are in runs/<stage>/latest/adapter; try\n"
          "  lit-ft chat --adapter runs/ppo/latest/adapter --prompt 'What is 12 + 30?'")
