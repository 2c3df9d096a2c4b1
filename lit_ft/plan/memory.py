"""Will it fit? A pre-flight plan of the peak GPU memory of a fit, by component, without loading any weights.

``estimate(model, datamodule, trainer)`` reads the same objects a fit has (the LightningModule's specs, the
DataModule's batch shape, the Trainer's precision and accumulation) and returns a `Plan`: the expected peak by
component, the total against a budget and, over budget, the cheapest changes that bring it under, each
re-estimated. ``lit-ft plan --config configs/sft.yaml [--budget 24GiB] [--model.lora.r 32 ...]`` (`lit_ft.cli.plan`)
parses the config with the project's LightningCLI, so every key and override means what it means to ``fit``.
`MemoryPlanLog` (`lit_ft.plan.log`) logs the plan at the start of a fit and ``torch.cuda.max_memory_allocated`` at
its end.

The model is counted on the meta device (`lit_ft.plan.weights`); activations follow the per-term formulas of
`lit_ft.plan.activations`. The batch is planned at its worst case: the real data's longest rows when the
DataModule's files are local (`lit_ft.plan.rows`: tokenized as the fit tokenizes them), else every row
``max_length`` tokens long; the table says which.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, replace

import torch

from lit_ft.online.generation import SamplingSpec
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.plan import stages as plan_stages
from lit_ft.plan.rows import RowStats, row_stats
from lit_ft.plan.sizes import fmt, ordinal, parse_size

log = logging.getLogger(__name__)

CONTEXT_ALLOWANCE = 600 * 2**20
"""CUDA context, cuBLAS/cuDNN workspaces and kernels' modules on the device: outside the caching allocator, so
never in `max_memory_allocated`, but taken from the card (about 0.5 GiB on Hopper with CUDA 12/13)."""
FRAGMENTATION = 0.10
"""The caching allocator reserves more than it hands out (block rounding, fragmentation): 10% of the peak."""


@dataclass
class Settings:
    """Everything the plan depends on, flat (what `estimate` reads from the module, datamodule and trainer)."""

    stage: str
    base: ModelSpec
    lora: LoraSpec | None
    optim: OptimSpec
    batch_size: int
    max_length: int
    packing: bool = False
    eval_batch_size: int | None = None
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    loss_chunk_size: int = 4096
    sampling: SamplingSpec | None = None
    ppo: object = None
    grpo: object = None
    dpo: object = None
    kto: object = None
    """`KTOModule.kto` (`KTOSpec`): the log-prob chunk, the precomputed reference and its batch."""
    distill: object = None
    teacher: ModelSpec | None = None
    """Distillation's separate frozen teacher model (`DistillModule.teacher`); None: none, or `teacher_adapter`."""
    teacher_adapter: str | None = None
    """Distillation's teacher as a frozen adapter of the student's base (`DistillModule.teacher_adapter`)."""
    value_model: str = "adapter"
    sft_adapter: str | None = None
    reward_adapter: str | None = None
    target: str = "cuda"
    data: RowStats | None = None
    """The real rows' lengths (`lit_ft.plan.rows.row_stats`); None: every row `max_length` tokens (the worst
    case)."""
    rows_note: str = ""
    """Why the rows are planned at `max_length` when `data` is None (a hub dataset, an unreadable file...)."""
    compile: bool = False
    """`compile: true` (each decoder layer through torch.compile): what inductor saves differs from eager."""
    compile_auto: bool = False
    """The module left `compile` to the plan (`compile: null`, the default of the stages that have it): `auto` may
    turn it on (`lit_ft.plan.auto`)."""
    cuda_graphs: bool = False
    """SFT's `cuda_graphs: true` (`lit_ft.train.graphs`): rows padded to a multiple of 64 tokens, no padding mask,
    every position through the head; the host queues a step in one launch."""
    cuda_graphs_auto: bool = False
    """The module left `cuda_graphs` to the plan (`cuda_graphs: null`, SFT's default)."""
    share_prompt: bool = False
    """Preference pairs as one row each, the prompt once (`data.share_prompt`, `SharedPromptCollator`)."""
    share_prompt_auto: bool = False
    """The DataModule left `share_prompt` to the plan (`share_prompt: null`, `PreferenceDataModule`'s default)."""
    ranks: int = 1
    """Processes training together (the trainer's world size): each reads its share of the rows a step."""
    process_group: bool = False
    """The strategy runs a process group (DDP, FSDP, DeepSpeed: even on one device), where checkpointed layers run
    non-reentrant (`lit_ft.models.checkpoint_layer`): more host work a recompute."""
    steps: int | None = None
    """Training steps the fit will take (`trainer.max_steps`, or its epochs of the rows read; an online stage's:
    rollouts, `planned_rollouts`); None: unknown."""
    validation: bool = True
    """The fit runs validation (False: `trainer.limit_val_batches` 0): KTO's validation passes and distillation's
    validation rollouts are planned only then."""
    episodes: object = None
    """The `EpisodeSpec` of an online stage with `model.environment` (None: one response a prompt): its episodes are
    planned at `max_tokens` response tokens, decoded by `generate` (`lit_ft.online.episodes`)."""
    head_dtype: str | None = None
    """"float32": the online stages' value/reward heads are cast back to fp32 after Lightning's `*-true` cast (as
    benchmarks/bench_ppo.py does); None: they are cast with the module."""


@dataclass
class Plan:
    """The expected peak memory of one fit by component (bytes), and what to change when it does not fit."""

    settings: Settings
    rows: list[tuple[str, int, str]]
    """(component, bytes, how it is counted) of the allocated peak."""
    off_peak: list[tuple[str, int, str]] = field(default_factory=list)
    """Shown but not in the peak: paged optimizer state (CUDA unified memory)."""
    allowance: int = 0
    budget: int | None = None
    notes: list[str] = field(default_factory=list)
    advice: list[tuple[str, list[str], int, bool]] = field(default_factory=list)
    """(change, CLI overrides, new total, fits) for each candidate change, cheapest first."""

    @property
    def peak(self) -> int:
        """Planned allocated peak: what `torch.cuda.max_memory_allocated` measures."""
        return sum(b for _, b, _ in self.rows)

    @property
    def total(self) -> int:
        """The peak plus the context/allocator allowance: what the card must hold."""
        return self.peak + self.allowance

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def table(self) -> str:
        s = self.settings
        seq = s.data.longest if s.data is not None else s.max_length
        lines = [f"memory plan: {s.stage} on {s.target} | {s.base.name_or_path or 'SmolLM2-135M-Instruct (bundled)'}"
                 f" | quantization {s.base.quantization} | precision {s.precision} | micro-batch {s.batch_size}"
                 f" x {seq} tokens | gradient checkpointing {s.base.gradient_checkpointing}",
                 f"rows: {s.data.note if s.data is not None else s.rows_note or f'max_length {s.max_length}'}", ""]
        width = max(len(c) for c, _, _ in self.rows + self.off_peak) + 2
        for c, b, how in self.rows:
            lines.append(f"  {c:<{width}}{fmt(b):>11}   {how}")
        lines.append(f"  {'= planned peak (allocated)':<{width}}{fmt(self.peak):>11}   compare: torch.cuda.max_memory_allocated")
        lines.append(f"  {'+ context/allocator allowance':<{width}}{fmt(self.allowance):>11}   "
                     f"{fmt(CONTEXT_ALLOWANCE) if s.target == 'cuda' else '0'} context + {FRAGMENTATION:.0%} of the peak")
        lines.append(f"  {'= total':<{width}}{fmt(self.total):>11}   " + (
            "no budget (no GPU visible; give --budget)" if self.budget is None else
            f"budget {fmt(self.budget)}: {'fits' if self.fits else 'DOES NOT FIT'}"))
        for c, b, how in self.off_peak:
            lines.append(f"  {c:<{width}}{fmt(b):>11}   {how}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.advice:
            lines += ["", "cheapest changes, in order (each re-estimated; cumulative last):"]
            for i, (what, args, total, ok) in enumerate(self.advice, 1):
                lines.append(f"  {i}. {what}: total {fmt(total)} {'fits' if ok else 'still over'}   {' '.join(args)}")
        return "\n".join(lines)

    def one_line(self) -> str:
        parts = ", ".join(f"{c.split(' (')[0]} {fmt(b)}" for c, b, _ in self.rows if b)
        budget = "" if self.budget is None else f" of {fmt(self.budget)} ({'fits' if self.fits else 'over budget'})"
        return f"memory plan: peak {fmt(self.peak)} ({parts}) + allowance {fmt(self.allowance)} = {fmt(self.total)}{budget}"

    def as_dict(self) -> dict:
        s = self.settings
        return {"stage": s.stage, "rows": s.data.note if s.data is not None else s.rows_note or "max_length",
                "peak": self.peak, "total": self.total, "budget": self.budget,
                "components": {c: b for c, b, _ in self.rows}, "off_peak": {c: b for c, b, _ in self.off_peak},
                "advice": [{"change": w, "overrides": a, "total": t, "fits": f} for w, a, t, f in self.advice]}


def default_budget() -> int | None:
    """The visible GPU's memory, or None on a machine without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


# ---------------------------------------------------------------------------------------------- estimate


def run_device(trainer=None) -> str:
    """What the run will use: the trainer's device when there is one, else a GPU if this machine has one."""
    root = getattr(getattr(trainer, "strategy", None), "root_device", None) if trainer is not None else None
    if root is not None:
        return "cuda" if root.type == "cuda" else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_steps(trainer, data: RowStats | None, batch_size: int, accumulate: int, ranks: int = 1) -> int | None:
    """Optimizer steps of the fit: `max_steps` when set, else `max_epochs` of the training rows read, each of `ranks`
    processes reading its share (None when neither says: no trainer, or rows the plan did not read)."""
    if trainer is None:
        return None
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    epochs = getattr(trainer, "max_epochs", None)
    if not epochs or epochs < 0 or data is None or not data.train_count:
        return None
    batches = -(-data.train_count // max(1, batch_size * ranks))
    limit = getattr(trainer, "limit_train_batches", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return epochs * max(1, batches // max(1, accumulate))


def planned_rollouts(trainer, s: Settings) -> int | None:
    """Rollouts of an online fit (its training steps): `max_steps` counts optimizer steps under manual
    optimization, so it is divided by the optimizer steps of one rollout's update; else `max_epochs` of the prompt
    batches read (`planned_steps`)."""
    max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
    if max_steps is not None and max_steps > 0:
        _, _, steps, passes = plan_stages.online.update_shape(s)
        return max(1, int(max_steps) // (passes * steps))
    return planned_steps(trainer, s.data, s.batch_size, 1, s.ranks)


def settings_from(model, datamodule=None, trainer=None, target: str | None = None) -> Settings:
    """Read a stage's settings from the objects of a fit (any of datamodule/trainer may be None: defaults)."""
    stage = plan_stages.stage_of(model)
    dm = datamodule
    precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
    accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
    data, rows_note = row_stats(dm)
    s = Settings(
        stage=stage, base=model.base, lora=model.lora, optim=model.optim,
        batch_size=getattr(dm, "batch_size", 8), max_length=getattr(dm, "max_length", 1024),
        packing=bool(getattr(dm, "packing", False)), eval_batch_size=getattr(dm, "eval_batch_size", None),
        precision=precision, accumulate_grad_batches=accumulate,
        loss_chunk_size=getattr(model, "loss_chunk_size", 4096),
        sampling=getattr(model, "sampling", None), ppo=getattr(model, "ppo", None), grpo=getattr(model, "grpo", None),
        dpo=getattr(model, "dpo", None), distill=getattr(model, "distill", None) if stage == "distill" else None,
        kto=getattr(model, "kto", None) if stage == "kto" else None,
        validation=trainer is None or getattr(trainer, "limit_val_batches", 1.0) != 0,
        teacher=getattr(model, "teacher_spec", None), teacher_adapter=getattr(model, "teacher_adapter", None),
        value_model=getattr(model, "value_model", "adapter"), sft_adapter=getattr(model, "sft_adapter", None),
        reward_adapter=getattr(model, "reward_adapter", None), target=target or run_device(trainer), data=data,
        rows_note=rows_note, compile=bool(getattr(model, "compile_layers", False)),
        compile_auto=hasattr(model, "compile_layers") and model.compile_layers is None,
        cuda_graphs=bool(getattr(model, "cuda_graphs", False)),
        cuda_graphs_auto=hasattr(model, "cuda_graphs") and model.cuda_graphs is None,
        share_prompt=bool(getattr(dm, "share_prompt", False)),
        share_prompt_auto=hasattr(dm, "share_prompt") and dm.share_prompt is None,
        episodes=getattr(model, "episodes", None) if getattr(model, "environment", None) is not None else None,
        ranks=max(1, int(getattr(trainer, "world_size", 1) or 1)), process_group=_parallel(trainer))
    return replace(s, steps=planned_rollouts(trainer, s) if stage in plan_stages.online.ONLINE
                   else planned_steps(trainer, data, s.batch_size, accumulate, s.ranks))


def _parallel(trainer) -> bool:
    """The trainer's strategy runs a process group (Lightning's parallel strategies: DDP, FSDP, DeepSpeed)."""
    from lightning.pytorch.strategies import ParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ParallelStrategy)


def estimate(model, datamodule=None, trainer=None, *, budget: int | str | None = "auto", target: str | None = None,
             advise: bool = True) -> Plan:
    """The memory plan of fitting `model` (an SFT/reward/DPO/PPO/GRPO LightningModule, not yet configured) on
    `datamodule` with `trainer`. `budget`: bytes or a size string; "auto" = the visible GPU's memory (None on a
    CPU). `target`: the device planned for, "cuda" or "cpu" (default: the one the run will use, `run_device`); it
    decides what `dtype: auto` means (bfloat16 on CUDA) and the CUDA context allowance."""
    return estimate_settings(settings_from(model, datamodule, trainer, target), budget=budget, advise=advise)


def estimate_settings(s: Settings, budget: int | str | None = "auto", advise: bool = True) -> Plan:
    budget = default_budget() if budget == "auto" else parse_size(budget)
    rows, off_peak, notes = plan_stages.components(s)
    plan = Plan(s, rows, off_peak, budget=budget, notes=notes)
    plan.allowance = (CONTEXT_ALLOWANCE if s.target == "cuda" else 0) + int(FRAGMENTATION * plan.peak)
    if advise and plan.fits is False:
        plan.advice = advice(s, budget)
    return plan


# ---------------------------------------------------------------------------------------------- advice


def levers(s: Settings):
    """(description, overrides, changed settings), cheapest first: changes that keep the result (micro-batch with
    accumulation, checkpointing, the loss chunk) before those that change the numerics (4-bit base, 8-bit
    optimizer state)."""
    online = s.stage in plan_stages.online.ONLINE
    p = getattr(s, s.stage, None) if online else None
    if online and p.mini_batch_size > 1:
        # Manual optimization: the spec's own minibatch and accumulation (Lightning refuses its accumulate flag);
        # a minibatch larger than the rollout acts as the rollout, so the halving starts from there.
        start = plan_stages.online.update_shape(s)[0]
        for k in (2, 4, 8, 16, 32, 64):
            mb, ga = max(start // k, 1), p.gradient_accumulation_steps * k
            yield (f"{s.stage.upper()} minibatch {p.mini_batch_size} -> {mb}, gradient_accumulation_steps x{k}",
                   [f"--model.{s.stage}.mini_batch_size", str(mb), f"--model.{s.stage}.gradient_accumulation_steps",
                    str(ga)], replace(s, **{s.stage: replace(p, mini_batch_size=mb, gradient_accumulation_steps=ga)}),
                   "microbatch")
            if mb == 1:
                break
    elif not online and s.batch_size > (floor := 2 if s.stage == "kto" else 1):  # KTO pairs rows of a micro-batch
        for k in (2, 4, 8, 16, 32, 64):
            b = max(s.batch_size // k, floor)
            yield (f"micro-batch {s.batch_size} -> {b}, accumulate_grad_batches x{k}",
                   ["--data.batch_size", str(b), "--trainer.accumulate_grad_batches", str(s.accumulate_grad_batches * k)],
                   replace(s, batch_size=b, accumulate_grad_batches=s.accumulate_grad_batches * k), "microbatch")
            if b == floor:
                break
    start = s.base.checkpoint_every if s.base.gradient_checkpointing else None
    for k in (4, 2, 1):  # the least recompute first: lever_options keeps the first of a kind that fits
        if start is None or k < start:
            cost = "about a third more compute" if k == 1 else f"about 1/{3 * k} more compute"
            args = ["--model.base.gradient_checkpointing", "true", "--model.base.checkpoint_every", str(k)]
            yield (f"gradient checkpointing{'' if k == 1 else f' of every {ordinal(k)} layer'} ({cost})",
                   args if k > 1 or start is not None else args[:2],
                   replace(s, base=replace(s.base, gradient_checkpointing=True, checkpoint_every=k)), "checkpointing")
    if s.target == "cuda" and not s.base.activation_offloading:
        yield ("activation offloading (saved activations in pinned host memory; PCIe time)",
               ["--model.base.activation_offloading", "true"],
               replace(s, base=replace(s.base, activation_offloading=True)), "offloading")
    if online and s.target == "cuda" and s.sampling is not None and s.sampling.engine != "hf":
        yield ("hf generate for rollouts (its KV cache is freed after each rollout; slower decoding)",
               ["--model.sampling.engine", "hf"], replace(s, sampling=replace(s.sampling, engine="hf")), "engine")
    if s.stage == "sft":  # (DPO's log-prob chunk, model.dpo.logp_chunk_size, is 1024)
        for chunk in (1024, 512, 256):  # the float32 logits of a chunk: chunk x vocab x 4 bytes, and their gradient
            if chunk < s.loss_chunk_size:
                yield (f"loss chunk {s.loss_chunk_size} -> {chunk} tokens", ["--model.loss_chunk_size", str(chunk)],
                       replace(s, loss_chunk_size=chunk), "chunk")
    if s.stage == "distill" and s.distill.logits_chunk_size > 256:
        yield (f"divergence chunk {s.distill.logits_chunk_size} -> 256 tokens",
               ["--model.distill.logits_chunk_size", "256"],
               replace(s, distill=replace(s.distill, logits_chunk_size=256)), "chunk")
    evaluated = s.eval_batch_size or s.batch_size  # the validation batch (the online engine keeps its rows)
    floor = 2 if s.stage == "kto" else 1  # KTO's held-out pairs meet in one batch
    if evaluated > floor:
        for k in (2, 4, 8):
            e = max(evaluated // k, floor) // floor * floor
            yield (f"validation batch {evaluated} -> {e} (no effect on training)", ["--data.eval_batch_size", str(e)],
                   replace(s, eval_batch_size=e), "evalbatch")
            if e == floor:
                break
    if s.base.quantization in ("none", "int8"):
        yield ("4-bit NF4 base with double quantization (QLoRA)", ["--model.base.quantization", "nf4"],
               replace(s, base=replace(s.base, quantization="nf4", double_quant=True)), "quantization")
    if s.optim.optimizer in ("adamw", "adamw_8bit"):
        yield ("paged 8-bit AdamW (state in unified memory, 8-bit)", ["--model.optim.optimizer", "paged_adamw_8bit"],
               replace(s, optim=replace(s.optim, optimizer="paged_adamw_8bit")), "optimizer")


def lever_options(s: Settings, budget: int, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """kind -> (description, overrides, changed settings, total, fits): each kind of change of `levers` on its
    own (for the micro-batch: the largest that fits, else the smallest), in their order; `skip`: kinds left out."""
    best: dict[str, tuple] = {}
    for what, args, changed, kind in levers(s):
        if kind in skip or (kind in best and best[kind][4]):
            continue
        total = estimate_settings(changed, budget=budget, advise=False).total
        best[kind] = (what, args, changed, total, total <= budget)
    return best


def combine(s: Settings, options: dict[str, tuple], budget: int) -> tuple[Settings, list[str], list[str]]:
    """The options applied one after the other, in order, until the total fits: (settings, changes, overrides)."""
    cum, whats, argv = s, [], []
    for what, args, changed, _, _ in options.values():
        if cum is not s and estimate_settings(cum, budget=budget, advise=False).fits:
            break
        cum = carry_over(cum, s, changed)
        whats.append(what.split(" (")[0])
        argv += args
    return cum, whats, argv


def advice(s: Settings, budget: int) -> list[tuple[str, list[str], int, bool]]:
    """Each kind of change on its own, then all of them in that order until the total fits (`combine`)."""
    options = lever_options(s, budget)
    out = [(what, args, total, fits) for what, args, _, total, fits in options.values()]
    together, whats, argv = combine(s, options, budget)
    if len(whats) > 1:
        total = estimate_settings(together, budget=budget, advise=False).total
        out.append(("together: " + " + ".join(whats), argv, total, total <= budget))
    return out


def carry_over(cum: Settings, start: Settings, changed: Settings) -> Settings:
    """Carry the fields `changed` differs in from `start` over to `cum` (dataclasses one level deep)."""
    updates = {}
    for f in dataclasses.fields(Settings):
        new, old = getattr(changed, f.name), getattr(start, f.name)
        if new != old:
            if dataclasses.is_dataclass(new):
                sub = {g.name: getattr(new, g.name) for g in dataclasses.fields(new)
                       if getattr(new, g.name) != getattr(old, g.name)}
                updates[f.name] = replace(getattr(cum, f.name), **sub)
            else:
                updates[f.name] = new
    return replace(cum, **updates)
