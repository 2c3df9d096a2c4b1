"""The memory components of each stage (SFT, reward, DPO, KTO, PPO, GRPO, distillation): what is resident, what peaks, and when.

`components(settings)` builds the stage's model on the meta device (its roles and adapters as the stage builds
them), counts it (`lit_ft.plan.weights`) and adds the activations and stage extras (`lit_ft.plan.activations`;
the online stages' rollout, no-grad passes and update in `lit_ft.plan.online`).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from lit_ft.models import families
from lit_ft.errors import ConfigError
from lit_ft.plan import activations as act
from lit_ft.plan import rows as rows_of
from lit_ft.plan import online
from lit_ft.plan import weights as pw
from lit_ft.plan.sizes import fmt, ordinal
from lit_ft.train.graphs import BUCKET as GRAPH_BUCKET

_STAGES = {"SFTModule": "sft", "RewardModule": "reward", "PPOModule": "ppo", "GRPOModule": "grpo",
           "DPOModule": "dpo", "KTOModule": "kto", "DistillModule": "distill"}
_OFFLINE_ROLES = ("kto",)  # policy and reference adapters of one base, as `online.ROLES` (`stages.offline`)
_HALF = {"bf16": torch.bfloat16, "16": torch.float16}


def stage_of(module) -> str:
    for cls in type(module).__mro__:
        if cls.__name__ in _STAGES:
            return _STAGES[cls.__name__]
    raise ConfigError(f"model: no memory plan for {type(module).__name__} (planned: SFT, reward, DPO, KTO, PPO, "
                      "GRPO, distillation modules)")


def precision_dtypes(precision: str, weight_dtype: torch.dtype) -> tuple[torch.dtype | None, int]:
    """(the dtype `*-true` half precision casts the module to, or None; bytes of an activation element).
    `*-mixed` autocasts matmuls (activations in half, weights as built); `32-true` computes in the weights'
    dtype."""
    prec = str(precision)
    kind = prec.split("-")[0]
    if kind in _HALF:
        half = _HALF[kind]
        return (half if prec.endswith("true") else None), half.itemsize
    return None, weight_dtype.itemsize


# ---------------------------------------------------------------------------------------------- models


def build_meta(s, config, dtype):
    """The stage's PEFT model on the meta device, the base's unquantized-module names, notes, the online stages'
    heads."""
    from peft import get_peft_model

    from lit_ft.models import lora_config

    notes, heads = [], []
    task = "score" if s.stage == "reward" else "causal_lm"
    base = pw.meta_model(s.base, task, config, dtype)
    keep = pw.unquantized_modules(base)
    with torch.device("meta"):
        if s.stage not in online.ROLES + _OFFLINE_ROLES:
            saved = pw.read_adapter_config(s.base.adapter)
            if s.base.adapter is not None and saved is None:
                notes.append(f"model.base.adapter {s.base.adapter} not found: assumed to be model.lora")
            if saved is not None:
                cfg = online.trainable_config(saved, "SEQ_CLS" if task == "score" else None)
            elif s.lora is not None:
                cfg = lora_config(s.lora, task, base)  # targets resolved on the meta base, as the real build
            else:
                raise ConfigError("model.lora is null and no model.base.adapter is given: nothing would be trained")
            return get_peft_model(base, cfg), keep, notes, heads
        return online.roles_meta(s, base, notes, heads), keep, notes, heads


def lora_shape(model, s, a: int, cast) -> act.LoraShape | None:
    """The adapted projections (the policy's, for PPO and GRPO), rank, dropout and working dtype, from the built
    model."""
    cfgs = getattr(model, "peft_config", {})
    name = "policy" if "policy" in cfgs else "default"
    cfg = cfgs.get(name)
    if cfg is None:
        return None
    # `...q_proj.lora_A.<adapter>.weight` -> q_proj (the module before lora_A; an expert parameter has no .weight)
    targets = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if f"lora_A.{name}" in n}
    dropout = cfg.lora_dropout > 0 and not (s.stage in online.ROLES and online.disable_dropout(s))
    adapter = next((p.dtype for n, p in model.named_parameters() if f"lora_A.{name}" in n), None)
    mixed = str(s.precision).endswith("mixed") and str(s.precision).split("-")[0] in _HALF
    nbytes = 2 if mixed else (cast or adapter or torch.float32).itemsize
    return act.LoraShape(frozenset(targets), int(cfg.r), dropout, nbytes, copies=mixed or nbytes != a)


# ---------------------------------------------------------------------------------------------- components


_CACHE: dict[str, tuple] = {}  # the counted meta model of recent settings: advice re-plans only batch shapes


def counted_model(s):
    """(dims, weight dtype, counts, LoRA shape, notes, heads, LoRA-wrapped base numel, whether the static decode
    engine serves the model) of the stage's meta model, cached by what decides them."""
    from lit_ft.online.engine_ops import engine_unsupported

    key = repr((s.stage, s.base, s.lora, s.precision, s.sft_adapter, s.reward_adapter, s.value_model, s.target,
                s.stage in online.ROLES and online.disable_dropout(s), s.teacher_adapter))
    if key not in _CACHE:
        config = pw.model_config(s.base)
        dtype = pw.resolve_dtype_for(s.base, s.target)
        cast, a = precision_dtypes(s.precision, dtype)
        model, keep, notes, heads = build_meta(s, config, dtype)
        counts = pw.count(model, s.base, keep, cast)
        merged = sum(p.numel() for n, p in model.named_parameters() if ".base_layer." in n)
        if len(_CACHE) > 16:
            _CACHE.clear()
        attn = getattr(model.get_base_model().config, "_attn_implementation", None) or "sdpa"  # `auto` resolved
        fused = any(n.endswith("qkv_proj") for n in families.linear_layers(model))
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        dims = dataclasses.replace(act.Dims.from_config(config), attn=attn, fused_qkv=fused,
                                   window=families.sliding_window(text)[0])
        engine = s.stage in online.ONLINE and engine_unsupported(model) is None
        _CACHE[key] = (dims, dtype, counts, lora_shape(model, s, a, cast), notes, heads, merged, engine)
    dims, dtype, counts, shape, notes, heads, merged, engine = _CACHE[key]
    return dims, dtype, copy.deepcopy(counts), shape, list(notes), heads, merged, engine


def _rollout_copy(s, numel: int, dtype: torch.dtype, notes: list[str]) -> list[tuple[str, int, str]]:
    """The rollout copy of the policy's LoRA-wrapped weights (`engine_ops.RolloutWeights`): `sampling.merged` (any
    base but 8-bit) or `sampling.dequantize` (4-bit bases), in the weights' dtype or a 4-bit base's compute dtype;
    what `fit` will refuse is said in the notes."""
    merged, dequantize, quant = s.sampling.merged, s.sampling.dequantize, s.base.quantization
    if not (merged or dequantize):
        return []
    setting = "sampling.merged" if merged else "sampling.dequantize"
    if quant == "int8" or (not merged and quant == "none"):
        notes.append(f"{setting}: refused with {'an 8-bit' if quant == 'int8' else 'a non-quantized'} base (the fit "
                     f"stops when it builds the roles); no copy planned")
        return []
    four_bit = quant != "none"
    copy_dtype = getattr(torch, s.base.compute_dtype) if four_bit else dtype
    what = "merged" if merged else "de-quantized"
    return [(f"{what} rollout copy", numel * copy_dtype.itemsize,
             f"{setting}: one copy of the LoRA-wrapped weights"
             + (f", de-quantized to {s.base.compute_dtype}" if four_bit else ""))]


def components(s):
    """(rows, off-peak rows, notes) of a stage's plan: [(component, bytes, how it is counted)]."""
    dims, dtype, counts, shape, notes, heads, merged, engine = counted_model(s)
    cast, a = precision_dtypes(s.precision, dtype)
    head_dtype = cast or torch.float32  # Lightning's *-true casts the fp32 heads too
    if s.head_dtype == "float32":  # ... unless they are cast back (a hook after the cast, as benchmarks/bench_ppo.py)
        head_dtype = torch.float32
    for numel, trainable in heads:
        nbytes = numel * head_dtype.itemsize
        role = "trainable" if trainable else "frozen"
        counts.adapters[role] = counts.adapters.get(role, 0) + nbytes
        if trainable:
            counts.trainable.append((numel, head_dtype))
    grads = sum(n * d.itemsize for n, d in counts.trainable)
    opt = pw.optimizer_state_bytes(counts.trainable, s.optim.optimizer)
    kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(counts.base.items(), key=lambda kv: -kv[1]))
    rows = [("base weights", counts.base_bytes, kinds),
            ("adapters + heads", counts.adapter_bytes,
             f"trainable {counts.adapters.get('trainable', 0) / 2**20:.1f} MiB, frozen roles "
             f"{counts.adapters.get('frozen', 0) / 2**20:.1f} MiB (PEFT on the meta model)"),
            ("gradients", grads, "trainable tensors, in their dtype")]
    off = []
    paged = s.optim.optimizer.startswith("paged")
    how = {"adamw": "AdamW: 2 moments in the parameters' dtype", "adamw_8bit": "8-bit AdamW: 2 bytes + absmax / 256"}
    if paged:
        off.append(("optimizer state (paged)", opt, "CUDA unified memory: pages out to host RAM under pressure, not in "
                    "max_memory_allocated, so not in the peak"))
        rows.append(("optimizer state", 0, "paged (below)"))
    else:
        rows.append(("optimizer state", opt, how.get(s.optim.optimizer, "2 x fp32 moments")))
    mask = 1 if s.target == "cuda" else None
    if s.stage == "reward":
        # the score head trains in float32 (`models.build.fp32_head`) unless a *-true precision casts it
        stage_rows = _reward(s, dims, a, shape, mask, (cast or torch.float32).itemsize)
    elif s.stage in online.ONLINE:
        # `rollout.autocast_mismatch`: autocast over weights of another dtype sends `auto` to the hf engine
        kind = str(s.precision).split("-")[0]
        mixed = str(s.precision).endswith("mixed") and kind in _HALF and dtype != _HALF[kind]
        teacher = online.teacher_plan(s, dims, a) if s.stage == "distill" else None
        if teacher is not None:
            rows.append(teacher.row)
        stage_rows = online.components(s, dims, a, shape, mask, _trunk, engine and not mixed, head_dtype.itemsize,
                                       teacher)
    else:
        stage_rows = {"sft": _sft, "dpo": _dpo, "kto": _kto}[s.stage](s, dims, a, shape, mask)
    rows += stage_rows
    if s.stage in online.ONLINE and s.sampling is not None:
        rows += _rollout_copy(s, merged, cast or dtype, notes)
    if s.stage == "dpo":
        notes.append("DPO: the policy over the 2B chosen + rejected rows; the no-grad reference pass runs before it")
    if s.stage == "distill":
        notes.append("distillation: the student's rollout, then the teacher's no-grad pass (its final hidden states "
                     "of the response tokens kept), then the student's update with the divergence's [tokens, vocab] "
                     "fp32 work model.distill.logits_chunk_size tokens at a time"
                     + ("; validation: greedy rollouts of the eval batch, the teacher's pass and the student's "
                        "no-grad divergence over all of it at once" if s.validation else
                        "; no validation (trainer.limit_val_batches 0)"))
    if s.stage == "kto":
        notes.append("KTO: the policy over the B examples; the no-grad passes (the reference's, and the mismatched "
                     "pairs' under policy and reference, B rows each) run before it"
                     + ("" if s.validation else "; no validation (trainer.limit_val_batches 0)"))
        if getattr(s.kto, "precompute_ref", False):
            off.append(("reference table (host)", kto_table_bytes(s),
                        "model.kto.precompute_ref: an int64 key and an fp32 log-prob an example, in host memory "
                        "(a batch's entries moved to the device at a time)"))
    return rows, off, notes


def _fmt(n: int) -> str:
    return fmt(n)


def _trunk(s, d, rows, seq, a, lora, mask, positions=False, shared=False):
    """The decoder's saved bytes; `positions`: position ids are passed (the online stages' left-padded rows, the
    reward model's). A mask reaches the attention for packed rows, and for padded ones: rows of different lengths
    (`plan_data.padded`; without data any batch of several rows, and every online or reward batch); transformers
    drops an all-ones mask (equal rows: the causal kernel, no repeated KV heads), and a captured SFT step leaves it out
    (`s.cuda_graphs`). `s.compile`: the layers through torch.compile (`plan_activations.layer_saved`). `shared`:
    shared-prompt rows (`data.share_prompt`): position ids and one additive mask every layer reads."""
    uneven = s.data is None or s.data.padded
    t = act.trunk_saved(d, rows, seq, a, lora, s.base.gradient_checkpointing, d.attn, mask,
                        pos_rows=rows if s.packing or positions or shared else 1,
                        masked=shared or s.packing or ((positions or rows > 1) and uneven and not s.cuda_graphs),
                        compiled=s.compile,
                        every=s.base.checkpoint_every, mask_copy=not shared)
    if s.base.activation_offloading and s.target == "cuda":  # `models.offload`: about two layers' worth in flight
        t = dict(t, layers=t["layers"] * min(1.0, 2 / d.layers))
    return t


def _lm_rows(s, d, seqs, a, lora, mask, label, chunk, loss_saved=act.loss_saved, transient=None):
    """The trunk and the chunked loss over the worst micro-batch of `seqs` sequences: `seqs` rows of the longest
    row (`plan_data.seq_len`), or packed (`plan_data.packed_shape`); the loss over its trained tokens, `chunk`
    positions of logits at a time. Returns the rows and the activations' peak."""
    shared = rows_of.shares_prompt(s)
    if shared:  # `seqs` = 2B sides of B pairs, each pair one row
        rows, L = rows_of.shared_shape(s, seqs // 2)
        n_loss = min(rows * L, rows_of.loss_tokens(s, seqs, 2 * s.max_length))
    elif s.packing:
        rows, L = rows_of.packed_shape(s, seqs)
        n_loss = min(rows * (L - 1), rows_of.loss_tokens(s, seqs, s.max_length))
    elif s.cuda_graphs:  # `lit_ft.train.graphs`: a bucket's length, every position through the head, no mask
        rows, L = seqs, -(-rows_of.seq_len(s) // GRAPH_BUCKET) * GRAPH_BUCKET
        n_loss, mask = rows * (L - 1), 0
    else:
        rows, L = seqs, rows_of.seq_len(s)
        n_loss = rows_of.loss_tokens(s, seqs, L)
    t = _trunk(s, d, rows, L, a, lora, mask, shared=shared)
    saved = t["layers"] + loss_saved(n_loss, rows, L, d.hidden, a)
    transient = transient or (lambda n, c: act.loss_transient(n, c, d.vocab, a))
    peak = max(transient(n_loss, chunk),
               act.backward_working(d, rows * L, a) + t["recompute"])
    every = s.base.checkpoint_every
    ckpt = ("every layer's saved tensors" if not s.base.gradient_checkpointing else
            "checkpointed: one [n, H] input a layer" if every == 1 else
            f"every {ordinal(every)} layer checkpointed (its [n, H] input), the others' saved tensors")
    ckpt += ", compiled layers" if s.compile else ""
    ckpt += ", CUDA graphs (64-token buckets)" if s.cuda_graphs else ""
    ckpt += ", offloaded to host (2 layers on the GPU)" if s.base.activation_offloading and s.target == "cuda" else ""
    return [(f"activations (saved, {label})", saved, f"{rows} x {L} tokens, {ckpt}, + loss gather"),
            ("activations (backward peak)", peak,
             f"max(loss chunk {min(chunk, n_loss)} x {d.vocab} fp32, layer backward"
             + (" + recompute)" if s.base.gradient_checkpointing else ")"))], saved + peak


def _sft(s, d, a, lora, mask):
    # the frozen head's fused loss (LoRA SFT): `fused_loss_transient` (a trained head would recompute its chunks)
    return _lm_rows(s, d, s.batch_size, a, lora, mask, "packed" if s.packing else "padded", s.loss_chunk_size,
                    transient=lambda n, c: act.fused_loss_transient(n, c, d.vocab))[0]


def _dpo(s, d, a, lora, mask):
    """The policy's forward and backward over the 2B chosen + rejected rows (`dpo_ref.sequence_logps`: log-prob
    chunks of `dpo.logp_chunk_size` positions), and the reference's no-grad pass, which runs first
    (`DPOModule.pair_stats`) and is freed before the policy's forward: it counts only by what it exceeds the
    policy's activations (precomputed reference: no pass)."""
    chunk = getattr(s.dpo, "logp_chunk_size", 1024)
    label = "pairs, the prompt once" if s.share_prompt else "chosen + rejected"
    rows, policy = _lm_rows(s, d, 2 * s.batch_size, a, lora, mask, label, chunk, act.logp_saved)
    ref = 0
    if s.dpo is None or not s.dpo.precompute_ref:
        n = (math.prod(rows_of.shared_shape(s, s.batch_size)) if s.share_prompt
             else 2 * s.batch_size * rows_of.seq_len(s))
        # a layer's forward at a time, then one chunk's logits in the activation dtype and fp32 and logsumexp's
        ref = max(act.nograd_forward(d, n, a), min(chunk, n) * d.vocab * (a + 8))
    rows.append(("reference pass (no grad)", max(0, ref - policy),
                 "runs before the policy's forward and is freed: only what it exceeds the policy's peak"))
    return rows


def logps_nograd(d, n: int, chunk: int, a: int) -> int:
    """Peak of a no-grad `dpo_ref.sequence_logps` over `n` tokens: a layer's forward at a time, then one chunk of
    `chunk` positions' logits in the activation dtype and in fp32, and logsumexp's fp32 work."""
    return max(act.nograd_forward(d, n, a), min(chunk, n) * d.vocab * (a + 8))


def kto_passes(s, d, a) -> dict[str, tuple[int, str]]:
    """KTO's no-grad passes, each run alone and freed before the next (`KTOModule.example_stats`): name ->
    (bytes, shape). Training: the reference over the B examples (not with `precompute_ref`: a table lookup), then
    the B mismatched pairs under the policy and the reference (`kl_estimate`, at `rows.mismatched_len`: the longest
    prompt + the longest completion, at most `max_length`). Validation (when the fit validates; no grad at all):
    the same passes and the policy's over the eval batch. `precompute_ref`: the table's pass before training,
    `ref_batch_size` examples of the longest training or validation row."""
    k = s.kto
    chunk = getattr(k, "logp_chunk_size", 1024)
    B, L, Lkl = s.batch_size, rows_of.seq_len(s), rows_of.mismatched_len(s)
    out = {"mismatched pairs": (logps_nograd(d, B * Lkl, chunk, a), f"{B} x {Lkl}")}
    if not getattr(k, "precompute_ref", False):
        out["reference"] = (logps_nograd(d, B * L, chunk, a), f"{B} x {L}")
    else:
        R, Lr = getattr(k, "ref_batch_size", 16), max(L, rows_of.eval_seq_len(s))
        out["precomputing the reference"] = (logps_nograd(d, R * Lr, chunk, a), f"{R} x {Lr}")
    if s.validation:
        E, Le, Lkle = s.eval_batch_size or B, rows_of.eval_seq_len(s), rows_of.mismatched_len(s, validation=True)
        out["validation"] = (max(logps_nograd(d, E * Le, chunk, a), logps_nograd(d, E * Lkle, chunk, a)),
                             f"{E} x {max(Le, Lkle)}")
    return out


def _kto(s, d, a, lora, mask):
    """KTO (`KTOModule.example_stats`): the policy's forward and backward over the B examples (log-prob chunks of
    `model.kto.logp_chunk_size` positions), after its no-grad passes (`kto_passes`), each freed before the next:
    they count only by what the largest exceeds the policy's activations."""
    chunk = getattr(s.kto, "logp_chunk_size", 1024)
    rows, policy = _lm_rows(s, d, s.batch_size, a, lora, mask, "examples", chunk, act.logp_saved)
    passes = kto_passes(s, d, a)
    top = max(passes, key=lambda k: passes[k][0])
    rows.append((f"no-grad passes (largest: {top})", max(0, passes[top][0] - policy),
                 ", ".join(f"{k} {v[1]}" for k, v in passes.items()) + ": one at a time, freed, outside the policy's "
                 "forward; only what the largest exceeds the policy's peak"))
    return rows


def kto_table_bytes(s) -> int:
    """`precompute_ref`'s table (`dpo_ref.ReferenceTable`): an int64 key and an fp32 log-prob an example of the
    training and validation rows read (0 without data), in host memory."""
    return (s.data.count if s.data is not None else 0) * (8 + 4)


def reward_shape(s) -> tuple[int, int]:
    """(rows, length) of the worst reward micro-batch: its 2B chosen + rejected rows of the longest pair side, or,
    packed (`data.packing`), the 2B longest sequences packed into rows of `max_length` (`rows.packed_shape`)."""
    seqs = 2 * s.batch_size
    if s.share_prompt:  # `data.share_prompt`: each pair one row, its prompt once
        return rows_of.shared_shape(s, s.batch_size)
    return rows_of.packed_shape(s, seqs) if s.packing else (seqs, rows_of.seq_len(s))


def reward_saved(s, d, a, lora, mask, head_bytes: int) -> tuple[int, int]:
    """(saved bytes, recompute extra) of one reward forward (`scoring.sequence_scores` over the 2B chosen+rejected
    rows with position ids, or `packed_sequence_scores`): the trunk, the indices [2B] of the last-token gather
    (int64) and the pooled states [2B, H] the trainable head keeps, in the head's dtype."""
    seqs = 2 * s.batch_size
    t = _trunk(s, d, *reward_shape(s), a, lora, mask, positions=True, shared=s.share_prompt)
    return t["layers"] + 2 * seqs * 8 + seqs * d.hidden * head_bytes, t["recompute"]


def _reward(s, d, a, lora, mask, head_bytes):
    rows, L = reward_shape(s)
    saved, recompute = reward_saved(s, d, a, lora, mask, head_bytes)
    peak = act.backward_working(d, rows * L, a) + recompute
    ev = 2 * (s.eval_batch_size or s.batch_size) * rows_of.eval_seq_len(s)
    what = (f"{rows} rows of the {s.batch_size} pairs, the prompt once" if s.share_prompt else
            f"{rows} packed rows of the {2 * s.batch_size} sequences" if s.packing else
            f"2B = {rows} rows (chosen + rejected)")
    return [("activations (saved)", saved, f"{what} x {L} tokens"),
            ("activations (backward peak)", max(peak, act.nograd_forward(d, ev, a)),
             "max(layer backward, validation forward of 2 x eval_batch_size rows)")]
