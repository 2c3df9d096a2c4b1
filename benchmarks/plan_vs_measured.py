"""The memory plan against the measured peak: a few training steps of each config on CUDA, JSON lines out.

    python benchmarks/plan_vs_measured.py --config configs/sft.yaml --config configs/reward.yaml \
        [--steps 5] [overrides applied to every config, e.g. --model.base.name_or_path meta-llama/Llama-3.2-1B]

For each config: `lit_ft.plan.memory` of the fit (the same LightningCLI parse as `fit`), then `--steps`
optimizer steps (PPO: rollouts) with no logger, checkpoint or validation, and `torch.cuda.max_memory_allocated`
against the planned peak. Without CUDA it prints the plan only (`measured_peak: null`), so the script runs
anywhere; the accuracy target (within 15%) is checked on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="a stage config (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (PPO: rollouts) to measure")
    return parser.parse_known_args(argv)


def build(config: str, overrides: list[str]):
    import lightning as L

    from lit_ft.cli.trainer import LitFTCLI

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=["--config", config, *overrides, "--trainer.logger", "false"],
                        save_config_callback=None)


def measure(cli, steps: int) -> int:
    """Peak allocated bytes of `steps` steps of the config's fit on one GPU."""
    import tempfile

    import lightning as L
    import torch

    t = cli.config["trainer"]
    length = {"limit_train_batches": steps, "max_epochs": 1} if type(cli.model).__name__ == "PPOModule" \
        else {"max_steps": steps}
    kwargs = {k: t[k] for k in ("precision", "accumulate_grad_batches", "gradient_clip_val") if t.get(k) is not None}
    if type(cli.model).__name__ == "PPOModule":
        kwargs.pop("accumulate_grad_batches", None)
    trainer = L.Trainer(accelerator="cuda", devices=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(),
                        **length, **kwargs)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return torch.cuda.max_memory_allocated()


def main(argv=None) -> int:
    import torch

    from lit_ft.plan import estimate

    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    for config in args.config:
        cli = build(config, overrides)
        plan = estimate(cli.model, cli.datamodule, cli.trainer, budget="auto", target="cuda", advise=False)
        measured = measure(cli, args.steps) if cuda else None
        print(json.dumps({
            "config": config, "overrides": overrides, "steps": args.steps if cuda else 0,
            "planned_peak": plan.peak, "planned_total": plan.total, "measured_peak": measured,
            "measured_over_planned": None if measured is None else round(measured / plan.peak, 3),
            "components": plan.as_dict()["components"],
        }), flush=True)
        del cli
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
