"""`--memory auto` (or a budget such as `24GiB`): before a fit loads any weights, the memory plan chooses the settings
the run uses. The run as configured when its plan fits; else the first change of the plan's advice that fits on its
own, in the advice's order (the cheapest first: micro-batch with gradient accumulation, keeping the effective batch;
gradient checkpointing; activation offloading; the rollout engine; the loss chunk; a paged 8-bit optimizer), else
those changes added one after the other until the total fits (`memory.combine`, the advice's last line); when even
all of them do not fit, a ConfigError naming the smallest total any of them reaches.
A 4-bit base is never chosen: it changes the model, not just how it is computed.

`auto` plans for the device's free memory (`torch.cuda.mem_get_info`); on a machine without a GPU it does nothing.
A size plans for that budget on the run's device (on a CPU: the host memory the planner counts). `auto` is the
default of `lit-ft fit` (`--memory off` turns it off): a run that fits is left as configured, so the default only
acts where the run would not fit; a run the planner cannot read (a module of the user's own, say) then runs as
configured, said in one line, where an explicit `--memory` would stop.
"""

from __future__ import annotations

import dataclasses

import torch

from lit_ft.errors import ConfigError
from lit_ft.plan.memory import Settings, combine, estimate_settings, lever_options, settings_from
from lit_ft.plan.sizes import fmt, parse_size


class NothingFits(ConfigError):
    """No settings `auto` may choose fit the budget."""


NEVER = ("quantization",)  # levers `auto` does not pull: they change the model
CUDA_ONLY = ("offloading", "engine", "optimizer")


def budget_of(memory: str) -> int | None:
    """Bytes to plan for: `auto` = the GPU's free memory (None without a GPU), else the size given."""
    if memory == "auto":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return parse_size(memory)


def choose(s: Settings, budget: int) -> tuple[Settings, list[str], list[str]]:
    """(settings to run with, what changed, the overrides that say it) for `budget`; ConfigError when nothing fits."""
    if estimate_settings(s, budget=budget, advise=False).fits:
        return s, [], []
    skip = NEVER + (CUDA_ONLY if s.target != "cuda" else ())
    options = lever_options(s, budget, skip)
    for what, args, changed, _, fits in options.values():
        if fits:
            return changed, [what], args
    together, whats, argv = combine(s, options, budget)
    total = estimate_settings(together, budget=budget, advise=False).total
    if whats and total <= budget:
        return together, whats, argv
    leanest = min([total] + [o[3] for o in options.values()])
    raise NothingFits(f"memory: nothing fits {fmt(budget)}: the leanest settings (micro-batch 1, every lever "
                      f"`lit-ft plan` knows but a 4-bit base) need {fmt(leanest)}; give a budget of at least that, "
                      "or a 4-bit base (model.base.quantization nf4) or a smaller model")


def apply(model, datamodule, trainer, start: Settings, chosen: Settings) -> None:
    """Put the chosen settings on the fit's objects (before `configure_model`: no weights are loaded yet)."""
    for f in dataclasses.fields(Settings):
        new = getattr(chosen, f.name)
        if new == getattr(start, f.name):
            continue
        if f.name == "batch_size":
            datamodule.batch_size = new
        elif f.name == "accumulate_grad_batches":
            trainer.accumulate_grad_batches = new
        elif f.name in ("base", "optim", "sampling", "ppo", "grpo", "distill", "loss_chunk_size"):
            setattr(model, f.name, new)
            if f.name in getattr(model, "hparams", {}) and dataclasses.is_dataclass(new):
                model.hparams[f.name] = dataclasses.asdict(new)  # what the checkpoint records
            elif f.name in getattr(model, "hparams", {}):
                model.hparams[f.name] = new
        else:
            raise ConfigError(f"memory: the plan changed {f.name}, which it cannot set on the run")


def fit_memory(model, datamodule, trainer, memory: str, say=print, asked: bool = True) -> None:
    """`--memory`: plan the fit and set what it chose on the objects; `say` gets the lines for the log. `asked`
    False is the default `auto`: silent without a GPU, and a run the planner cannot read runs as configured."""
    budget = budget_of(memory)
    if budget is None:
        if asked:
            say("memory auto: no GPU on this machine, nothing to plan (give a size to plan for host memory)")
        return
    try:
        start = settings_from(model, datamodule, trainer)
        chosen, whats, argv = choose(start, budget)
    except NothingFits as e:
        if asked:
            raise
        raise ConfigError(f"{e} (the default --memory auto planned this run; --memory off runs it as "
                          "configured)") from e
    except Exception as e:
        if asked:
            raise
        say(f"memory auto: no plan for this run ({type(e).__name__}: {e}); it runs as configured "
            "(--memory off skips the plan)")
        return
    plan = estimate_settings(chosen, budget=budget, advise=False)
    if not whats:
        say(f"memory {memory}: the run fits as configured ({fmt(plan.total)} of {fmt(budget)})")
        return
    apply(model, datamodule, trainer, start, chosen)
    say(f"memory {memory}: {' + '.join(whats)} -> {fmt(plan.total)} of {fmt(budget)} (as overrides: {' '.join(argv)})")
    say(plan.table())
