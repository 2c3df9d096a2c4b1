"""`lit-ft plan`: the memory plan of a fit (`lit_ft.plan`), from the same config and overrides as `fit`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import lightning as L

from lit_ft.cli.app import lit_ft_cause
from lit_ft.cli.trainer import LitFTCLI
from lit_ft.plan.memory import Plan, estimate, estimate_settings
from lit_ft.plan.sizes import fmt, parse_size


USAGE = """usage: lit-ft plan --config CONFIG.yaml [--budget 24GiB] [--device cuda|cpu] [--json] [overrides]

The memory plan of `fit` with the same config and overrides (e.g. --model.lora.r 32 --data.batch_size 4), and, for
a budget (given, or the GPU's memory), what `fit --memory auto` would run instead, as overrides."""


def main(argv: list[str] | None = None) -> int:
    """`lit-ft plan`: print the plan (or its JSON); exit 0, or 2 on a bad setting."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--budget", default="auto")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if ours.help or not rest:
        print(USAGE)
        return 0
    try:
        budget = ours.budget if ours.budget == "auto" else parse_size(ours.budget)  # before the (slower) parse
        plan = plan_from_cli(rest, budget=budget, target=ours.device)
    except Exception as e:
        cause = lit_ft_cause(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    auto = auto_choice(plan)
    if ours.json:
        print(json.dumps({**plan.as_dict(), "auto": auto}, indent=1))
        return 0
    print(plan.table())
    if auto is not None:
        print(f"\nfit --memory auto ({fmt(plan.budget)}): " + (
            f"{' + '.join(auto['changes'])} -> {fmt(auto['total'])} (as overrides: {' '.join(auto['overrides'])})"
            if auto["changes"] else "runs it as configured" if "error" not in auto else auto["error"]))
    return 0


def auto_choice(plan: Plan) -> dict | None:
    """What `fit --memory auto` chooses for the plan's budget (`lit_ft.plan.auto.choose`): its changes, overrides
    and planned total, or the error it would stop with; None without a budget."""
    from lit_ft.plan.auto import NothingFits, choose

    if plan.budget is None:
        return None
    try:
        chosen, changes, overrides = choose(plan.settings, plan.budget)
    except NothingFits as e:
        return {"changes": [], "overrides": [], "total": None, "error": str(e)}
    return {"changes": changes, "overrides": overrides, "total": estimate_settings(chosen, budget=None, advise=False).total}


def plan_from_cli(args: list[str], budget="auto", target: str | None = None) -> Plan:
    """Parse `args` exactly as `fit` does (LitFTCLI, run=False; no logger is made) and estimate."""
    with warnings.catch_warnings():  # `args` given while sys.argv holds the same options
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=[*args, "--trainer.logger", "false"], save_config_callback=None)
    return estimate(cli.model, cli.datamodule, cli.trainer, budget=budget, target=target)
