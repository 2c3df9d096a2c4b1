"""The memory plan of the online-RL stages, PPO and GRPO/RLOO (`lit_ft.online.shared`): their roles as adapters of one
meta-device base, the rollout (the decode engine's static KV cache and buffers, `lit_ft.online.engine`), the no-grad
passes (scores, old and reference log-probs) and the minibatch update, of which the largest sets the peak.

Both stages share one rollout and update path, so one set of formulas serves them; they differ in their roles
(PPO: policy, reference, reward, value; GRPO: policy and reference, a reward adapter only when given, no value
model) and in their spec section (`model.ppo` / `model.grpo`, same field names for the shapes used here).
`tests/test_plan.py` checks the roles against the real tensors, the update forward against what autograd saves
and the engine row against a real `DecodeEngine`'s cache and buffers.
"""

from __future__ import annotations

import copy

from lit_ft.plan import activations as act
from lit_ft.plan import rows as plan_data
from lit_ft.plan import weights as pw
from lit_ft.errors import ConfigError

ONLINE = ("ppo", "grpo")
SELECTIVE_CHUNK = 1024  # rows `losses.selective_log_softmax` / `entropy_from_logits` convert to fp32 at a time


ROLES = ONLINE + ("dpo",)  # the stages whose policy and reference are adapters of one base (`roles.build_roles`)


def spec_of(s):
    """The stage's spec section: `model.ppo` (PPOSpec), `model.grpo` (GRPOSpec) or `model.dpo` (DPOSpec)."""
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
    samples_per_prompt episodes; validation rolls out eval_batch_size prompts once each through the same engine,
    which keeps the largest batch it has seen (`DecodeEngine._allocate`). Prompts are left-padded to the batch's
    longest (`PromptCollator`): the longest real prompt, else `max_length` (`plan_data.seq_len`)."""
    p, sp = spec_of(s), s.sampling
    rows = s.batch_size * p.samples_per_prompt
    engine_rows = max(rows, s.eval_batch_size or s.batch_size)
    return rows, engine_rows, plan_data.seq_len(s), sp.max_new_tokens, min(p.mini_batch_size, rows)


def engine_prompt(s, P: int) -> int:
    """The prompt width the engine allocates: the largest it has seen (`DecodeEngine._allocate` keeps the maximum
    of every shape), so the longest of the training and the validation prompts."""
    return max(P, s.data.eval_longest or 0) if s.data is not None else P


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


def components(s, d: act.Dims, a: int, lora, mask, trunk, engine_ok: bool, head_bytes: int = 4
               ) -> list[tuple[str, int, str]]:
    """Rows of the rollout (engine), the rollout record and the largest phase (rollout prefill, no-grad passes,
    update). `engine_ok`: `sampling.engine: auto` picks the static engine for this model and precision
    (`rollout.Sampler.resolve`: CUDA, an attention the engine serves, no autocast over weights of another dtype)."""
    p, sp = spec_of(s), s.sampling
    rows, erows, P, R, mbs = shapes(s)
    seq, Pe = P + R, engine_prompt(s, P)
    static = s.target == "cuda" and (sp.engine == "static" or (sp.engine == "auto" and engine_ok))
    engine = engine_bytes(d, erows, Pe, R, a)
    # Prefill (one no-grad pass over the prompts, `logits_to_keep=1`): a layer's forward, the bool visibility
    # [rows, 1, P, P + R], the last position's logits [rows, V] in the activation dtype and in fp32.
    prefill = act.nograd_forward(d, erows * Pe, a) + erows * Pe * (Pe + R) + erows * d.vocab * (a + 4)
    # No-grad passes, mbs rows at a time: a layer's forward over mbs x (P + R) and the logits (old and reference
    # log-probs, entropy); a reward adapter's scoring pass has only the trunk.
    nograd = act.nograd_forward(d, mbs * seq, a) + nograd_logits(d, mbs, R, a, sp.temperature)
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
    out = [("KV cache (rollout)", engine if static else 0,
            f"{erows} rows x ({Pe} + {R}) positions" + (", static engine: resident" if static else " (hf: freed)")),
           ("rollout buffers", record, f"ids, masks and log-probs of {rows} episodes")]
    kv_hf = act.kv_cache(d, erows, Pe + R, a)
    phase = max(("rollout", (0 if static else kv_hf) + prefill), ("no-grad passes", nograd), ("update", update),
                key=lambda x: x[1])
    out.append((f"activations (peak phase: {phase[0]})", phase[1],
                f"update: {mbs} rows x {seq} tokens with grad; rollout: prefill of {erows} x {Pe}"))
    return out
