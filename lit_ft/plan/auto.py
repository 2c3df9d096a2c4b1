"""`--memory auto` (or a budget such as `24GiB`): before a fit loads any weights, the memory plan chooses the settings
the run uses: the FASTEST combination of the plan's levers that fits, by a step-time model (`step_seconds`), among
micro-batch with gradient accumulation (keeping the effective batch), gradient checkpointing (every 4th, 2nd or every
layer), activation offloading, the rollout engine, the loss chunk, the validation batch, a paged 8-bit optimizer and,
on a GPU, compiled decoder layers where the module left `compile` to it (`compile: null`, the default), the base is
not quantized and the run is long enough for the faster steps to pay for compiling, and SFT's steps replayed from CUDA
graphs where the module left `cuda_graphs` to it (one process, unpacked rows, an unquantized base), each combination
planned in full (`memory.estimate_settings`).
A run that fits as configured is left as configured unless a faster combination fits with `SPEED_MARGIN` to spare:
checkpointing it does not need turned off, accumulation it does not need folded into larger micro-batches (the
effective batch kept) — more memory for more speed, said in the log.
When nothing fits, a ConfigError naming the smallest total any combination reaches.
A 4-bit base is never chosen: it changes the model, not just how it is computed.

Why a time model and not a fixed order: which lever is cheap depends on the model. A micro-batch costs a fixed
launch and host time per decoder layer whatever its size, so a 135M model split into micro-batches of one row runs
many times slower, while recomputing its small layers (checkpointing) costs little; a 1B model at 16k tokens a step
is compute-bound, so halving its micro-batch costs almost nothing and checkpointing a third more compute.

`auto` plans for the device's free memory (`torch.cuda.mem_get_info`); on a machine without a GPU it does nothing.
A size plans for that budget on the run's device (on a CPU: the host memory the planner counts). `auto` is the
default of `lit-ft fit` (`--memory off` turns it off); a run the planner cannot read (a module of the user's own,
say) then runs as configured, said in one line, where an explicit `--memory` would stop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import torch

from lit_ft.errors import ConfigError
from lit_ft.models import families, shared_prompt
from lit_ft.plan import rows as rows_of
from lit_ft.losses.preference import REFERENCE_FREE_LOSSES
from lit_ft.plan.memory import Settings, carry_over, estimate_settings, levers, settings_from
from lit_ft.plan.online import ONLINE, shapes, spec_of, update_shape
from lit_ft.plan.sizes import fmt, parse_size
from lit_ft.plan.weights import model_config


class NothingFits(ConfigError):
    """No settings `auto` may choose fit the budget."""


NEVER = ("quantization",)  # levers `auto` does not pull: they change the model
CUDA_ONLY = ("offloading", "engine", "optimizer", "compile", "graphs")
SPEED_MARGIN = 0.85
"""A change that spends memory for speed (checkpointing off, larger micro-batches) is taken only when the plan's
total stays within this share of the budget: the plan is within about 15% of measured peaks."""

# The step-time model's rates, fitted so that its seconds are about the measured ones of an H100 (BENCHMARKS.md,
# "The step-time model refitted"): the host queues a LoRA step's kernels at about 8 ms a decoder layer for the
# forward and backward of one micro-batch (a 16-row SmolLM2-135M step: 0.26 s measured and modelled unchecked; the
# recompute of checkpointing's reentrant eager layers adds RECOMPUTE_HOST of that), the GPU runs its matmuls at an
# effective ~260 TFLOP/s with the element-wise work between them (DPO on the 1B shape, 8 pairs of 2048-token
# sequences, reference pass included: 0.94 s measured, 0.93 s modelled; checkpointed 1.15 and 1.18 s), and a step
# takes the slower of the two, since the GPU works while the host queues; host transfers at ~25 GB/s (W1 offloading
# without checkpointing: 36 GB a step cost 1.4 s), on top. Choices need only the ratios; whether compiling pays
# needs seconds. CPU: no overlap, and the per-layer overhead is small against its matmul rate.
RATES = {"cuda": dict(layer_s=8e-3, step_s=2e-2, flops=2.6e14, pcie=25e9, layer_gpu_s=3e-3),
         "cpu": dict(layer_s=2e-4, step_s=1e-3, flops=2e11, pcie=float("inf"), layer_gpu_s=0.0)}
"""`layer_gpu_s`: the GPU's floor for one decoder layer's forward and backward of one micro-batch, however small: a
LoRA layer runs a few hundred kernels, each a few microseconds at least (H100, 2026-12-07: SmolLM2-135M's 30 layers,
16 GSM8K rows in 64-token buckets, replayed from CUDA graphs: 91 ms a step unchecked, 128 ms checkpointed, modelled
90 and 120).
A step's GPU time is the larger of this floor and its FLOPs; the host's work hides it unless the step is captured."""
RECOMPUTE_HOST = 0.06
"""The host work of recomputing checkpointed layers, a share of the eager step's layer work: eager layers checkpoint
reentrant (`lit_ft.models.checkpoint_layer`: the first forward builds no graph), which measured 0.68x the step of
non-reentrant checkpointing (H100, same calls, 2026-12-07: g135 0.677, HH reward 0.709), itself about 1.56x an
unchecked step in earlier calls (BENCHMARKS.md, "The step-time model refitted"): 1.06x, chained across calls (HH's
ratio alone gives 1.13x; the CPU's host work alone, bench_host.py, 1.39x). Not measured in one call."""
RECOMPUTE_HOST_COMPILED = 0.5
"""The same share for compiled layers, which checkpoint non-reentrant (what dynamo traces), and for every layer under
a process group (DDP, FSDP: non-reentrant too)."""
COMPILED_HOST, COMPILED_GPU = 0.65, 0.71
"""A compiled step's host work and GPU time against the eager step's: fewer, fused kernels to queue and to run
(H100: the g135 step, host-bound and checkpointed, 0.86x and 0.95x the reentrant eager step in two calls of
2026-12-07, with two compiled variants that were not kept, and 0.585x the non-reentrant eager step; the compiled
layers as they are now, non-reentrant with static shapes first, not measured against the reentrant eager step; the
1B DPO step, GPU-bound, 0.71x)."""
COMPILE_SECONDS = 30.0
"""What compiling costs a run once (inductor: one graph shared by the layers, and the recompile for a second
shape): g135 on an H100 took 27 s longer to its first 23 steps compiled than eagerly; spread over the run's steps
by the step-time model. (Two variants measured on 2026-12-07 and not kept cost more: compiled layers checkpointed
reentrant, about 65 s; dynamic shapes from the start, about 84 s.)"""
GRAPH_HOST_S = 3e-3
"""The host work of one captured micro-batch: its inputs copied in, the replay launched, the outputs copied out, the
gradients bound (the step's framework and optimizer work is `step_s`)."""
COMPILED_UPDATE = 0.80
"""An online stage's update with compiled decoder layers against the eager one (H100, W5: PPO on the 1B shape, 64
episodes of 128 + 256 tokens, 4 epochs of minibatch 8: 5.51 against 6.85 s, 2026-12-07). The rollout, scoring and
no-grad passes stay eager, and the step-time model of an online step counts its update alone."""
COMPILE_SECONDS_ONLINE = 100.0
"""What compiling costs an online run once: each role that trains (PPO's policy and value adapters) compiles its
own graphs, with dynamic shapes from the start; W5's first update took 112 s compiled against 9.2 s eager."""


def budget_of(memory: str) -> int | None:
    """Bytes to plan for: `auto` = the GPU's free memory, within the process's share of the card where
    `torch.cuda.set_per_process_memory_fraction` set one (None without a GPU), else the size given."""
    if memory == "auto":
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        fraction = getattr(torch.cuda.memory, "get_per_process_memory_fraction", lambda: 1.0)()
        if fraction < 1.0:  # `torch.cuda.set_per_process_memory_fraction`: the process may not use the rest
            free = min(free, int(fraction * total) - torch.cuda.memory_reserved())
        return int(free)
    return parse_size(memory)


def _shape(s: Settings) -> tuple[int, int, int, int]:
    """(rows of one micro-batch's forward, its length, micro-batches of a step, trained passes over them) of the
    training pass. An online stage's step is its update of one rollout: minibatches of prompt + response rows,
    every pass over the rollout (PPO's epochs, GRPO's iterations), PPO's value adapter a second role pass."""
    if s.stage in ONLINE and spec_of(s) is not None:
        mini, minibatches, _, passes = update_shape(s)
        _, _, prompt, response, _ = shapes(s)
        roles = 2 if s.stage == "ppo" and s.value_model == "adapter" else 1
        return mini, prompt + response, minibatches, passes * roles
    if rows_of.shares_prompt(s):  # each pair one row, its prompt once
        return (*rows_of.shared_shape(s, s.batch_size), s.accumulate_grad_batches, 1)
    pairs = 2 if s.stage in ("dpo", "reward", "kto") else 1  # chosen + rejected; KTO's mismatched KL rows
    return pairs * s.batch_size, s.data.longest if s.data is not None else s.max_length, s.accumulate_grad_batches, 1


def step_seconds(s: Settings) -> float:
    """Modelled seconds of one training step under `s` (an online stage's: its update of one rollout, not the
    rollout): a fixed host cost per micro-batch and decoder layer against the GPU's matmul FLOPs of the padded
    tokens (forward, and backward through frozen weights: input gradients only; what checkpointing recomputes; a
    reference pass), activation offloading's host transfers, small costs of a smaller loss chunk and a paged 8-bit
    optimizer, compiled layers (faster passes, the compiling spread over the run's steps), and `generate` instead of
    the static engine (rollouts several times slower: as long again as the eager update, compiled or not)."""
    from lit_ft.plan.stages import counted_model

    d = counted_model(s)[0]
    r = RATES["cuda" if s.target == "cuda" else "cpu"]
    rows, seq, micro, passes = _shape(s)
    proj = d.hidden * d.heads * d.head_dim * 2 + 2 * d.hidden * d.kv_heads * d.head_dim
    trunk = d.layers * (proj + 3 * d.hidden * d.intermediate)
    n = trunk + d.hidden * d.vocab
    ckpt = (1.0 / max(1, s.base.checkpoint_every)) if s.base.gradient_checkpointing else 0.0
    ref = 1.0 if _reference_pass(s) else 0.0
    online = s.stage in ONLINE
    compiled = s.compile and not online  # (an online update's compiling is its own factor, below)
    # forward 2N, backward 2N, the decoder's recomputed forward (not the head) x share, the reference's forward 2N;
    # attention's forward, backward (twice its forward), recomputed and reference forwards
    flops = micro * rows * (seq * (4 * n + 2 * trunk * ckpt + 2 * n * ref)
                            + attention_flops(s, d, rows, seq) * (3 + ckpt + ref))
    recompute = RECOMPUTE_HOST_COMPILED if s.compile or s.process_group else RECOMPUTE_HOST
    host = micro * (r["step_s"] / max(1, micro) + d.layers * r["layer_s"] * (1 + recompute * ckpt + ref / 3))
    gpu = max(flops / r["flops"], micro * d.layers * r["layer_gpu_s"] * (1 + ckpt / 3 + ref / 3))
    if compiled:
        host, gpu = host * COMPILED_HOST, gpu * COMPILED_GPU
    if s.cuda_graphs:  # the step's kernels queued in one launch a micro-batch
        host = r["step_s"] + micro * GRAPH_HOST_S
    # a GPU runs the kernels while the host queues the next ones: the slower of the two sets the step; a CPU does both
    t = max(host, gpu) if s.target == "cuda" else host + gpu
    if s.base.activation_offloading:
        kept = dataclasses.replace(s, base=dataclasses.replace(s.base, activation_offloading=False))
        t += micro * _saved_bytes(kept) / r["pcie"]
    if s.stage == "sft":
        t += micro * (rows * seq // max(1, s.loss_chunk_size)) * 2e-4
    if "paged" in s.optim.optimizer:
        t *= 1.02
    eager = t = t * passes
    if s.compile:  # faster steps, and the compiling spread over the run (a run of unknown length: never paid back)
        t = (t * COMPILED_UPDATE if online else t) + (
            (COMPILE_SECONDS_ONLINE if online else COMPILE_SECONDS) / s.steps if s.steps else float("inf"))
    if online and s.sampling is not None and s.sampling.engine == "hf":
        t += eager  # rollouts through `generate`: several times slower decoding (BENCHMARKS.md, rollout engine)
    return t


def attention_flops(s: Settings, d, rows: int, seq: int) -> float:
    """One row's attention forward over `seq` tokens, every layer: q.k and p.v, 4 x seq^2 x heads x head_dim, half of
    it for causal rows (a causal kernel skips the upper half; modelled so for every batch, as no other lever changes a
    row's length) and all of it for shared-prompt rows (`data.share_prompt`: an additive mask, every block computed)
    — what decides whether one row of P + C + R tokens beats two of P + C and P + R."""
    return 4 * seq * seq * d.heads * d.head_dim * d.layers * (1.0 if rows_of.shares_prompt(s) else 0.5)


def _reference_pass(s: Settings) -> bool:
    """A no-grad forward of the reference model in every step: DPO's and KTO's, unless precomputed before training
    or the loss needs none."""
    if s.stage == "dpo" and s.dpo is not None:
        return not (s.dpo.precompute_ref or s.dpo.loss_type in REFERENCE_FREE_LOSSES)
    return s.stage == "kto" and s.kto is not None and not s.kto.precompute_ref


_SAVED: dict[str, int] = {}


def _saved_bytes(s: Settings) -> int:
    """The activations a micro-batch saves for backward under `s` (what offloading moves to the host and back)."""
    key = repr(dataclasses.replace(s, eval_batch_size=None))  # (the training pass does not depend on it)
    if key not in _SAVED:
        if len(_SAVED) > 256:
            _SAVED.clear()
        _SAVED[key] = sum(b for c, b, _ in estimate_settings(s, budget=None, advise=False).rows
                          if c.startswith("activations (saved"))
    return _SAVED[key]


def _faster(s: Settings):
    """Changes that spend memory for speed: (description, overrides, changed settings, kind)."""
    if s.base.gradient_checkpointing:
        yield ("gradient checkpointing off (no recompute)", ["--model.base.gradient_checkpointing", "false"],
               dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=False)), "checkpointing")
    if s.stage not in ONLINE and s.accumulate_grad_batches > 1:
        for k in (2, 4, 8, 16, 32, 64):
            if s.accumulate_grad_batches % k:
                break
            b, ga = s.batch_size * k, s.accumulate_grad_batches // k
            yield (f"micro-batch {s.batch_size} -> {b}, accumulate_grad_batches /{k}",
                   ["--data.batch_size", str(b), "--trainer.accumulate_grad_batches", str(ga)],
                   dataclasses.replace(s, batch_size=b, accumulate_grad_batches=ga), "microbatch")


def _compiled(s: Settings):
    """Compiled decoder layers (the online stages': in the update's gradient passes only,
    `lit_ft.models.compile_gradient_passes`), where the module left `compile` to the plan: (description, overrides,
    changed settings, kind). Not a change that spends memory: inductor saves no more than eager. Not for a 4-bit or 8-bit
    base: its projections are bitsandbytes' own kernels, which compiling has not been measured to speed up
    (`compile: true` still compiles one)."""
    if s.compile_auto and not s.compile and s.base.quantization == "none":
        yield ("compiled decoder layers", ["--model.compile", "true"], dataclasses.replace(s, compile=True), "compile")


def _graphed(s: Settings):
    """SFT's steps replayed from CUDA graphs (`lit_ft.train.graphs`), where the module left `cuda_graphs` to the plan
    and the step can be captured: one process, unpacked rows, no compiled layers asked for, an unquantized base
    (bitsandbytes' kernels inside a graph are not measured). Memory: rows padded to 64-token buckets, every position
    through the head (`lit_ft.plan.stages`)."""
    if (s.cuda_graphs_auto and not s.cuda_graphs and s.stage == "sft" and not s.packing and s.ranks == 1
            and not s.process_group and s.base.quantization == "none" and s.precision not in ("16-mixed", "16")
            and not families.routes_experts(model_config(s.base))):
        yield ("CUDA graphs", ["--model.cuda_graphs", "true"], dataclasses.replace(s, cuda_graphs=True), "graphs")


def _shared(s: Settings):
    """Preference pairs as one row each, the prompt once (`data.share_prompt`), where the DataModule left it to the
    plan and the model's family takes it (`shared_prompt.takes`): fewer tokens in every pass, the same log-probs."""
    if (s.share_prompt_auto and not s.share_prompt and s.stage in rows_of.SHARING_STAGES
            and shared_prompt.takes(model_config(s.base), s.base.attn_implementation)):
        yield ("shared prompts", ["--data.share_prompt", "true"], dataclasses.replace(s, share_prompt=True), "shared")


def choose(s: Settings, budget: int) -> tuple[Settings, list[str], list[str]]:
    """(settings to run with, what changed, the overrides that say it) for `budget`: the fastest combination that
    fits (`step_seconds`; on a tie fewer tokens a step, then fewer changes); ConfigError when nothing fits."""
    skip = NEVER + (CUDA_ONLY if s.target != "cuda" else ())
    kinds: dict[str, list] = {}
    faster = {c[0] for c in _faster(s)}
    for option in itertools.chain(_faster(s), _compiled(s), _graphed(s), _shared(s), levers(s)):
        if option[3] not in skip:
            kinds.setdefault(option[3], []).append(option)
    combos = []
    for combo in itertools.product(*[[None, *opts] for opts in kinds.values()]):
        changes = [c for c in combo if c is not None]
        cand = s
        for c in changes:
            cand = carry_over(cand, s, c[2])
        if cand.cuda_graphs and (cand.compile or cand.base.activation_offloading):  # (`SFTModule` refuses both)
            continue
        rows, seq, micro, _ = _shape(cand)  # on a tie, fewer tokens (shared prompts), then fewer changes
        combos.append(((step_seconds(cand), rows * seq * micro, len(changes)), cand, changes))
    combos.sort(key=lambda x: x[0])
    best = None
    for key, cand, changes in combos:  # the fastest first: the first that fits is the choice
        room = budget * SPEED_MARGIN if any(c[0] in faster for c in changes) else budget
        if estimate_settings(cand, budget=budget, advise=False).total <= room:
            best = (key, cand, changes)
            break
    if best is None:
        leanest = min(estimate_settings(c, budget=budget, advise=False).total for _, c, _ in combos)
        raise NothingFits(f"memory: nothing fits {fmt(budget)}: the leanest settings (every lever `lit-ft plan` "
                          f"knows but a 4-bit base) need {fmt(leanest)}; give a budget of at least that, "
                          "or a 4-bit base (model.base.quantization nf4) or a smaller model")
    _, chosen, changes = best
    return chosen, [c[0].split(" (")[0] for c in changes], [a for c in changes for a in c[1]]


def apply(model, datamodule, trainer, start: Settings, chosen: Settings) -> None:
    """Put the chosen settings on the fit's objects (before `configure_model`: no weights are loaded yet)."""
    for f in dataclasses.fields(Settings):
        new = getattr(chosen, f.name)
        if new == getattr(start, f.name):
            continue
        if f.name == "batch_size":
            datamodule.batch_size = new
        elif f.name == "eval_batch_size":
            datamodule.eval_batch_size = new
        elif f.name == "share_prompt":
            datamodule.share_prompt = new
        elif f.name == "accumulate_grad_batches":
            trainer.accumulate_grad_batches = new
        elif f.name == "compile":
            model.compile_layers = new
            model.compile_planned = new  # a layer that fails to compile then runs eagerly (`compile_decoder_layers`)
            if "compile" in getattr(model, "hparams", {}):
                model.hparams["compile"] = new  # what the checkpoint records
        elif f.name == "cuda_graphs":
            model.cuda_graphs = new
            model.graphs_planned = new  # a model it cannot capture (NEFTune, say) then runs eagerly
            if "cuda_graphs" in getattr(model, "hparams", {}):
                model.hparams["cuda_graphs"] = new
        elif f.name in ("base", "optim", "sampling", "ppo", "grpo", "distill", "loss_chunk_size"):
            setattr(model, f.name, new)
            if f.name in getattr(model, "hparams", {}) and dataclasses.is_dataclass(new):
                model.hparams[f.name] = dataclasses.asdict(new)  # what the checkpoint records
            elif f.name in getattr(model, "hparams", {}):
                model.hparams[f.name] = new
        else:
            raise ConfigError(f"memory: the plan changed {f.name}, which it cannot set on the run")


RECORD = "memory_plan.json"
"""In the run directory: the budget the run's first fit planned for (`fit_memory`'s `record`)."""


def fit_memory(model, datamodule, trainer, memory: str, say=print, asked: bool = True, record: Path | None = None,
               resuming: bool = False) -> None:
    """`--memory`: plan the fit and set what it chose on the objects; `say` gets the lines for the log. `asked`
    False is the default `auto`: silent without a GPU, and a run the planner cannot read runs as configured.
    `record`: a file (the run directory's `RECORD`) that keeps the budget `auto` planned for; `resuming` (a fit from
    a checkpoint of that run) plans for that budget again, not for what is free now, so that it makes the first
    fit's choice (a different micro-batch would replay the data in other batches than the checkpoint counted)."""
    budget = budget_of(memory)
    if memory == "auto" and budget is not None and resuming and record is not None and record.is_file():
        try:
            budget = int(json.loads(record.read_text())["budget"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{record}: not the memory plan's record ({type(e).__name__}: {e}); delete it to plan "
                              "for the memory free now") from e
        say(f"memory auto: a resumed fit, planned for the budget of its first fit ({fmt(budget)}, {record})")
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
    if record is not None and not record.is_file() and getattr(trainer, "is_global_zero", True):
        record.write_text(json.dumps({"memory": memory, "budget": budget}) + "\n")
    plan = estimate_settings(chosen, budget=budget, advise=False)
    if not whats:
        say(f"memory {memory}: the run fits as configured ({fmt(plan.total)} of {fmt(budget)})")
        return
    apply(model, datamodule, trainer, start, chosen)
    configured = estimate_settings(start, budget=budget, advise=False)
    speed = step_seconds(start) / step_seconds(chosen)
    say(f"memory {memory}: {' + '.join(whats)} -> {fmt(plan.total)} of {fmt(budget)} (as overrides: {' '.join(argv)}); "
        f"as configured {fmt(configured.total)}, {'fits' if configured.fits else 'does not fit'}; modelled speed "
        f"x{speed:.2f} of the configured {'update' if start.stage in ONLINE else 'run'}")
    say(plan.table())
