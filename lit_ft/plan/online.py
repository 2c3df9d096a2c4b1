"""The memory plan of the online stages, PPO, GRPO/RLOO and on-policy distillation (`lit_ft.online.shared`): their roles as adapters of one
meta-device base, the rollout (the decode engine's static KV cache and buffers, `lit_ft.online.engine`), the no-grad
passes (scores, old and reference log-probs) and the minibatch update, of which the largest sets the peak.

Both stages share one rollout and update path, so one set of formulas serves them; they differ in their roles
(PPO: policy, reference, reward, value; GRPO: policy and reference, a reward adapter only when given, no value
model; distillation: policy, and the teacher as a frozen adapter or a separate frozen model) and in their spec
section (`model.ppo` / `model.grpo` / `model.distill`, same field names for the shapes used here). Distillation has
no old or reference log-prob pass: the teacher's no-grad pass keeps its final hidden states of the response tokens,
and the update adds the chunked [tokens, vocab] fp32 divergence (`distill_chunk_saved`).
`tests/test_plan.py` checks the roles against the real tensors, the update forward against what autograd saves
and the engine row against a real `DecodeEngine`'s cache and buffers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lit_ft.plan import activations as act
from lit_ft.plan import rows as plan_data
from lit_ft.plan import weights as pw
from lit_ft.plan.sizes import fmt
from lit_ft.errors import ConfigError

ONLINE = ("ppo", "grpo", "distill")
SELECTIVE_CHUNK = 1024  # rows `losses.selective_log_softmax` / `entropy_from_logits` convert to fp32 at a time


ROLES = ONLINE + ("dpo",)  # the stages whose policy and reference are adapters of one base (`roles.build_roles`)


def spec_of(s):
    """The stage's spec section: `model.ppo` (PPOSpec), `model.grpo` (GRPOSpec), `model.distill` (DistillSpec) or
    `model.dpo` (DPOSpec)."""
    return getattr(s, s.stage, None)


def disable_dropout(s) -> bool:
    return bool(getattr(spec_of(s), "disable_dropout", False))


def trainable_config(cfg, task=None):
    """A copy of a saved adapter's PEFT config that trains (a role's adapter built from it), with `task`."""
    cfg = copy.deepcopy(cfg)
    cfg.inference_mode = False
    if task is not None:
        cfg.task_type = task
    return cfg


def roles_meta(s, base, notes, heads):
    """The roles on one meta base as `lit_ft.online.roles.build_roles` builds them: policy (+ a frozen `ref` copy of the
    SFT adapter), reward (frozen, with its frozen fp32 score head), and for PPO the value model (adapter + head, or
    a head on the policy's trunk); GRPO and DPO have no value model (DPO no reward either). Heads as (numel,
    trainable) fp32 tensors."""
    from peft import get_peft_model

    from lit_ft.models import lora_config

    lora_cfg = lora_config(s.lora, "causal_lm", base) if s.lora is not None else None
    sft = pw.read_adapter_config(s.sft_adapter)
    reward = pw.read_adapter_config(s.reward_adapter)
    for name, path, found in (("sft_adapter", s.sft_adapter, sft), ("reward_adapter", s.reward_adapter, reward)):
        if path is not None and found is None:
            notes.append(f"{name} {path} not found yet: its LoRA is assumed to be model.lora")
    policy = trainable_config(sft, "CAUSAL_LM") if sft is not None else lora_cfg
    if policy is None:
        raise ConfigError(f"{s.stage.upper()} needs a policy adapter: set sft_adapter or lora")
    model = get_peft_model(base, policy, adapter_name="policy")
    if s.sft_adapter is not None:
        model.add_adapter("ref", copy.deepcopy(policy))
    if s.stage == "distill" and s.teacher_adapter is not None:  # `roles.build_roles(frozen={TEACHER: ...})`
        teacher = pw.read_adapter_config(s.teacher_adapter)
        if teacher is None:
            notes.append(f"teacher_adapter {s.teacher_adapter} not found yet: its LoRA is assumed to be the policy's")
        model.add_adapter("teacher", trainable_config(teacher, "CAUSAL_LM") if teacher is not None
                          else copy.deepcopy(policy))
    hidden = base.config.hidden_size
    rcfg = None
    if s.reward_adapter is not None:
        rcfg = trainable_config(reward, "CAUSAL_LM") if reward is not None else copy.deepcopy(lora_cfg or policy)
        rcfg.modules_to_save = None
        model.add_adapter("reward", rcfg)
        heads.append((hidden + 1, False))  # the frozen score head, fp32 (roles.linear_head)
    value = s.value_model if s.stage == "ppo" else "none"
    if value == "adapter":
        model.add_adapter("value", copy.deepcopy(rcfg or lora_cfg or policy))
    if value != "none":
        heads.append((hidden + 1, True))  # the value head, fp32, trainable
    for n, p in model.named_parameters():  # what roles.AdapterRoles.restore_flags sets
        p.requires_grad_(".policy." in n or ".value." in n)
    return model


# ---------------------------------------------------------------------------------------------- shapes


def shapes(s) -> tuple[int, int, int, int, int]:
    """(rollout rows, engine rows, prompt P, response R, minibatch rows). A rollout holds batch_size x
    samples_per_prompt episodes; validation (where the fit runs it) rolls out eval_batch_size prompts once each
    through the same engine, which keeps the largest batch it has seen (`DecodeEngine._allocate`). Prompts are
    left-padded to the batch's longest (`PromptCollator`): the longest real prompt, else `max_length`
    (`plan_data.seq_len`). Episodes against an environment hold up to `episodes.max_tokens` response tokens, the
    model's turns and the environment's."""
    p, sp = spec_of(s), s.sampling
    rows = s.batch_size * getattr(p, "samples_per_prompt", 1)  # distillation: one response a prompt
    engine_rows = max(rows, s.eval_batch_size or s.batch_size) if s.validation else rows
    R = s.episodes.max_tokens if getattr(s, "episodes", None) is not None else sp.max_new_tokens
    return rows, engine_rows, plan_data.seq_len(s), R, min(p.mini_batch_size, rows)


def update_shape(s) -> tuple[int, int, int, int]:
    """(minibatch rows, minibatches of one pass over the rollout, optimizer steps of one pass, passes over the
    rollout: PPO's `ppo_epochs`, GRPO's `num_iterations`, distillation's one) of an online stage's update. An
    optimizer step takes `gradient_accumulation_steps` minibatches, the last one of a pass what is left
    (`online.shared.update`)."""
    p = spec_of(s)
    rows = s.batch_size * getattr(p, "samples_per_prompt", 1)
    mini = min(p.mini_batch_size, rows)
    minibatches = -(-rows // mini)
    passes = getattr(p, "ppo_epochs", None) or getattr(p, "num_iterations", None) or 1
    return mini, minibatches, -(-minibatches // max(1, p.gradient_accumulation_steps)), int(passes)


def engine_prompt(s, P: int) -> int:
    """The prompt width the engine allocates: the largest it has seen (`DecodeEngine._allocate` keeps the maximum
    of every shape), so the longest of the training and (where the fit validates) the validation prompts."""
    return max(P, s.data.eval_longest or 0) if s.data is not None and s.validation else P


def engine_bytes(d: act.Dims, rows: int, P: int, R: int, a: int) -> int:
    """What the static decode engine allocates once and keeps (`DecodeEngine._allocate`): transformers'
    `StaticCache` (keys and values [rows, k, P + R, d] a layer in the activation dtype, and one int64
    `cumulative_length` a layer), the step's int64 token and position [rows, 1] and counter, the prompt
    visibility [rows, P + R] (bool), the int64 column index [P + R], the finished flags [rows] (bool), and the
    response buffers: tokens [rows, R] int64 and log-probs [rows, R] fp32."""
    L = P + R
    kv = act.kv_cache(d, rows, L, a) + d.layers * 8
    return kv + 2 * rows * 8 + 8 + rows * L + L * 8 + rows + rows * R * (8 + 4)


def logits_saved(d: act.Dims, rows: int, R: int) -> int:
    """Response logits as the update keeps them: `families.lm_logits` casts the head's output to fp32
    (`LogitTransform.apply`; the cast and a division by a temperature save nothing), and the checkpointed chunks of
    `selective_log_softmax` keep that fp32 [rows, R, V] as their input; Gemma-2-style soft-capping keeps tanh's
    output too (a second fp32 copy)."""
    return rows * R * d.vocab * 4 * (2 if d.logit_softcap else 1)


def policy_saved(s, d: act.Dims, a: int, lora, mask, trunk, head_bytes: int = 4) -> tuple[int, int]:
    """(saved bytes, recompute extra) of the policy's forward over one minibatch (`online.logprobs` under the
    policy adapter, what PPO's `policy_forward` and GRPO's `minibatch_step` run): the trunk over prompt + response
    with position ids, the fp32 response logits and the int64 token index [mbs x R, 1] of the gather. PPO's
    shared-trunk value head keeps its input [mbs x R, H] in the head's dtype (`head_bytes`: fp32, or half under
    `*-true`): the response slice of the hidden states is not contiguous, so the cast or the linear's flattening
    copies it."""
    _, _, P, R, mbs = shapes(s)
    t = trunk(s, d, mbs, P + R, a, lora, mask, positions=True)
    saved = t["layers"] + logits_saved(d, mbs, R) + mbs * R * 8
    if s.stage == "ppo" and s.value_model == "shared_trunk":
        saved += mbs * R * d.hidden * head_bytes
    return saved, t["recompute"]


def nograd_logits(d: act.Dims, rows: int, R: int, a: int, temperature: float) -> int:
    """Peak of a no-grad log-prob pass after the trunk: the head's output [rows, R, V] in the activation dtype, its
    fp32 cast (the same tensor in fp32) and the quotient by a temperature, alive together inside
    `LogitTransform.apply`; then `entropy_from_logits`'s fp32 chunk work (log-softmax, its exp and their product,
    1024 rows at a time)."""
    n = rows * R * d.vocab
    head = n * a + (n * 4 if a != 4 else 0) + (n * 4 if temperature != 1.0 else 0)
    return max(head, n * 4 + min(SELECTIVE_CHUNK, rows * R) * d.vocab * 4 * 3)


def components(s, d: act.Dims, a: int, lora, mask, trunk, engine_ok: bool, head_bytes: int = 4,
               teacher: "TeacherPlan | None" = None) -> list[tuple[str, int, str]]:
    """Rows of the rollout (engine), the rollout record and the largest phase (rollout prefill, no-grad passes,
    update). `engine_ok`: `sampling.engine: auto` picks the static engine for this model and precision
    (`Sampler.resolve`: CUDA, an attention the engine serves, no autocast over weights of another dtype; a sliding
    window is checked here against the rollout's length).
    `teacher`: distillation's teacher (`teacher_plan`), whose pass and divergence replace the log-prob passes."""
    p, sp = spec_of(s), s.sampling
    rows, erows, P, R, mbs = shapes(s)
    seq, Pe = P + R, engine_prompt(s, P)
    # `engine: static` on any device (eager off CUDA); `auto` on CUDA only, and for a sliding-window model only where
    # the window covers the rollout (`Sampler.resolve`); episodes decode with `generate`
    covered = d.window is None or d.window >= Pe + R
    static = (sp.engine == "static" or (s.target == "cuda" and sp.engine == "auto" and engine_ok and covered)) \
        and getattr(s, "episodes", None) is None
    engine = engine_bytes(d, erows, Pe, R, a)
    prefill = prefill_bytes(s, d, a, rows, erows, Pe, R, static)
    kv_hf = act.kv_cache(d, erows, Pe + R, a)
    # No-grad passes, mbs rows at a time: a layer's forward over mbs x (P + R) and the logits (old and reference
    # log-probs, entropy); a reward adapter's scoring pass has only the trunk.
    nograd = act.nograd_forward(d, mbs * seq, a) + nograd_logits(d, mbs, R, a, sp.temperature)
    if s.stage == "distill":
        return distill_components(s, d, a, lora, mask, trunk, teacher, static, engine, prefill, kv_hf)
    saved, recompute = policy_saved(s, d, a, lora, mask, trunk, head_bytes)
    # The backward: one layer's gradient buffers (+ the recomputed layer under checkpointing) and one recomputed
    # fp32 chunk of the log-softmax with its gradient and logsumexp work (3 x [1024, V]).
    chunks = min(SELECTIVE_CHUNK, mbs * R) * d.vocab * 4 * 3
    update = saved + act.backward_working(d, mbs * seq, a) + recompute + chunks
    # The rollout record of `rows` episodes: prompt ids and mask [rows, P], responses and mask [rows, R] (int64),
    # old/ref log-probs and entropy [rows, R] fp32 (PPO also values, rewards, advantages, returns, whitening:
    # 5 more); GRPO's dynamic sampling copies the kept rows once more (`Rollout.rows`).
    record = rows * (2 * P + 2 * R) * 8 + rows * R * 4 * (8 if s.stage == "ppo" else 3)
    if s.stage == "grpo" and p.dynamic_sampling:
        record *= 2
    out = [kv_row(erows, Pe, R, engine, static), ("rollout buffers", record, f"ids, masks and log-probs of {rows} episodes")]
    phase = max(("rollout", (0 if static else kv_hf) + prefill), ("no-grad passes", nograd), ("update", update),
                key=lambda x: x[1])
    out.append((f"activations (peak phase: {phase[0]})", phase[1],
                f"update: {mbs} rows x {seq} tokens with grad; rollout: prefill of {erows} x {Pe}"))
    return out


def prefill_bytes(s, d: act.Dims, a: int, rows: int, erows: int, Pe: int, R: int, static: bool) -> int:
    """Peak of the rollout's prefill: one no-grad pass over each distinct prompt (`logits_to_keep=1`; the copies of
    a prompt share it, in either engine): a layer's forward over the distinct prompts, the bool visibility
    [erows, 1, P, P + R] (the static engine's, of every row), the last position's logits [distinct, V] in the
    activation dtype and in fp32; where the static engine shares a prefill, also the distinct prompts' own KV cache,
    their visibility [distinct, 1, P, P], one layer's keys and values repeated to every row on their way into the
    static cache and the logits repeated to every row in fp32 (`DecodeEngine._prefill`). The larger of the training rollout
    (`batch_size` distinct prompts of `samples_per_prompt` copies, padded up to the engine's rows with copies of
    the first) and a validation rollout (one copy of each of `eval_batch_size` prompts)."""
    k = getattr(spec_of(s), "samples_per_prompt", 1)
    kinds = [s.batch_size if k > 1 else rows] + ([s.eval_batch_size or s.batch_size] if s.validation else [])

    def one(n: int) -> int:
        n = min(n, erows)
        own = (act.kv_cache(d, n, Pe, a) + n * Pe * Pe + act.kv_cache(d, erows, Pe, a) // d.layers
               + erows * d.vocab * 4) if static and n < erows else 0
        return act.nograd_forward(d, n * Pe, a) + erows * Pe * (Pe + R) + n * d.vocab * (a + 4) + own

    return max(one(n) for n in kinds)


def kv_row(erows: int, Pe: int, R: int, engine: int, static: bool) -> tuple[str, int, str]:
    return ("KV cache (rollout)", engine if static else 0,
            f"{erows} rows x ({Pe} + {R}) positions" + (", static engine: resident" if static else " (hf: freed)"))


# ---------------------------------------------------------------------------------------------- distillation


@dataclass
class TeacherPlan:
    """Distillation's teacher: its shapes, the bytes of its activations and hidden states, its weights' row."""

    dims: act.Dims
    a: int
    """Bytes of an element of its activations and of the final hidden states it hands the update."""
    row: tuple[str, int, str]


def teacher_plan(s, d: act.Dims, a: int) -> TeacherPlan:
    """The teacher of `DistillModule`: a frozen adapter of the student's base (`teacher_adapter`: counted with the
    adapters, its passes of the student's shapes), or a separate frozen model (`teacher`: its weights counted as
    `build_model` holds a base, quantization included, on the meta device). The separate teacher is no submodule of
    the LightningModule, so Lightning's `*-true` cast leaves it in its own dtype; `*-mixed` autocast computes its
    matmuls in half."""
    if s.teacher is None:
        return TeacherPlan(d, a, ("teacher weights", 0, "model.teacher_adapter: a frozen adapter of the student's "
                                  "base (in adapters + heads)"))
    config = pw.model_config(s.teacher)
    dtype = pw.resolve_dtype_for(s.teacher, s.target)
    model = pw.meta_model(s.teacher, "causal_lm", config, dtype)
    counts = pw.count(model, s.teacher, pw.unquantized_modules(model))
    kind = str(s.precision).split("-")[0]
    half = {"bf16": torch.bfloat16, "16": torch.float16}.get(kind)
    ta = half.itemsize if half is not None and str(s.precision).endswith("mixed") else dtype.itemsize
    kinds = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(counts.base.items(), key=lambda kv: -kv[1]))
    return TeacherPlan(act.Dims.from_config(config), ta,
                       ("teacher weights", counts.base_bytes + counts.adapter_bytes,
                        f"model.teacher {s.teacher.name_or_path or '(bundled default)'}, frozen: {kinds}"))


DISTILL_SAVED = {0.0: 2, 1.0: 3}
"""fp32 [chunk, V] tensors `losses.generalized_jsd` saves for its backward: forward KL the two log-softmaxes
(the teacher's as the product's operand); reverse KL also the student's probabilities; a JSD between the two
log-softmaxes, the mixture and the two probabilities and one difference (6). The temperature's division and the
half-precision logits' fp32 cast save nothing (`tests/test_plan.py` counts them through saved_tensors_hooks)."""


def distill_chunk_saved(tokens: int, vocab: int, beta: float) -> int:
    """Bytes one chunk of `tokens` positions of `losses.chunked_generalized_jsd` saves under grad (what its
    checkpointed chunk re-creates in the backward)."""
    return tokens * vocab * 4 * DISTILL_SAVED.get(float(beta), 6)


def distill_transient(tokens: int, vocab: int, beta: float, a: int) -> int:
    """One chunk's recomputation in the backward: its saved fp32 tensors, the incoming and outgoing fp32 gradient
    [chunk, V] and the head output's gradient in the activation dtype."""
    return distill_chunk_saved(tokens, vocab, beta) + tokens * vocab * (8 + a)


def distill_components(s, d, a, lora, mask, trunk, t: TeacherPlan, static, engine, prefill, kv_hf):
    """`DistillModule`: the rollout (one response a prompt) with the sampler's log-probs, the teacher's final
    hidden states [rows, R, Ht] kept on the rollout, the teacher's no-grad pass (a layer's forward over a minibatch
    and its last hidden state), and the update: the student's trunk with grad, the gathered response states of
    both models [n, H] / [n, Ht] (the checkpointed chunks' inputs) and one chunk's recomputation."""
    p = spec_of(s)
    rows, erows, P, R, mbs = shapes(s)
    seq, Pe = P + R, engine_prompt(s, P)
    record = rows * (2 * P + 2 * R) * 8 + rows * R * 4 + rows * R * t.dims.hidden * t.a
    n = mbs * R
    teacher = act.nograd_forward(t.dims, mbs * seq, t.a) + mbs * seq * t.dims.hidden * t.a
    tr = trunk(s, d, mbs, seq, a, lora, mask, positions=True)
    chunk = min(p.logits_chunk_size, n)
    saved = tr["layers"] + n * d.hidden * a + n * t.dims.hidden * t.a + mbs * R
    update = (saved + act.backward_working(d, mbs * seq, a) + tr["recompute"]
              + distill_transient(chunk, d.vocab, p.beta, a))
    out = [kv_row(erows, Pe, R, engine, static),
           ("rollout buffers", record, f"ids, masks, sampler log-probs of {rows} episodes and the teacher's final "
            f"hidden states [{rows}, {R}, {t.dims.hidden}]")]
    phases = [("rollout", (0 if static else kv_hf) + prefill), ("teacher pass", teacher), ("update", update)]
    if s.validation:
        phases.append(("validation", distill_validation(s, d, a, t, record)))
    phase = max(phases, key=lambda x: x[1])
    val = (f"; validation: {s.eval_batch_size or s.batch_size} greedy rollouts, their teacher's pass and the "
           f"student's no-grad divergence, {fmt(phases[-1][1])}" if s.validation else "")
    out.append((f"activations (peak phase: {phase[0]})", phase[1],
                f"update: {mbs} rows x {seq} tokens with grad + the divergence, {chunk} x {d.vocab} fp32 a chunk; "
                f"rollout: prefill of {erows} x {Pe}" + val))
    return out


NOGRAD_DIVERGENCE = 8
"""fp32 [chunk, V] tensors alive at once in a no-grad chunk of `losses.chunked_generalized_jsd` (validation): both
models' logits, both log-softmaxes, the mixture and a product's operands (an upper bound over beta; the reverse KL
beside it reuses the same budget once the divergence's are freed)."""


def distill_validation(s, d: act.Dims, a: int, t: TeacherPlan, record: int) -> int:
    """`DistillModule.validation_step` over one eval batch of E prompts (`eval_batch_size`, else `batch_size`; the
    validation prompts' longest, else `max_length`), greedy, one response each: its rollout record (no sampler
    log-probs) with the teacher's final hidden states [E, R, Ht], beyond the training record it replaces; then the
    larger of the teacher's pass (minibatch rows at a time) and the student's no-grad divergence over all E rows at
    once: a layer's forward, then the trunk's final hidden states [E, P + R, H] with the response states of both
    models gathered [n, H] / [n, Ht] and one chunk's fp32 work (`NOGRAD_DIVERGENCE`) with the head's output in the
    activation dtype."""
    p, R = spec_of(s), s.sampling.max_new_tokens
    E, P = s.eval_batch_size or s.batch_size, plan_data.eval_seq_len(s)
    seq, mbs, n = P + R, min(p.mini_batch_size, E), E * R
    val_record = E * (2 * P + 2 * R) * 8 + E * R * t.dims.hidden * t.a
    teacher = act.nograd_forward(t.dims, mbs * seq, t.a) + mbs * seq * t.dims.hidden * t.a
    chunk = min(p.logits_chunk_size, n)
    student = max(act.nograd_forward(d, E * seq, a), E * seq * d.hidden * a + n * d.hidden * a
                  + n * t.dims.hidden * t.a + chunk * d.vocab * (NOGRAD_DIVERGENCE * 4 + a))
    return max(0, val_record - record) + max(teacher, student)
