"""The memory plan against the real thing: every weight, adapter, gradient and optimizer-state figure equals the
bytes of the tensors of the really built model (tiny Llama; the bundled SmolLM2 in the slow tests), under no
quantization, NF4 and int8, for SFT, reward, DPO and the PPO and GRPO roles; the activation terms equal the bytes
autograd saves for one forward on the CPU (Llama and Phi-3 layers, SFT/reward/PPO/GRPO forwards); the rollout row
equals a real decode engine's cache and buffers; the CLI reads the configs as `fit` does and its advice
re-estimates correctly."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.cli import plan as plan_cli
from lit_ft.models import adapters
from lit_ft.plan import memory as plan
from lit_ft.plan import activations as act
from lit_ft.errors import ConfigError
from lit_ft.models import LoraSpec, ModelSpec, build_model
from lit_ft.train.optim import OptimSpec, make_optimizer
from lit_ft.plan import Settings, estimate_settings

QUANT = ["none", "nf4", "int8"]


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight, a shared quantization map, counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _quant_tensors(p):
    """The tensors a bitsandbytes weight holds beside itself: 4-bit absmax, code, nested state; int8 row scales."""
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        yield from (qs.absmax, qs.code)
        if qs.nested:
            yield from (qs.offset, qs.state2.absmax, qs.state2.code)
    if getattr(p, "SCB", None) is not None:
        yield p.SCB


def real_split(model, heads=()) -> dict[str, int]:
    """Bytes of the real model: base (frozen weights, buffers, quantization constants), adapters, trainable."""
    base, adapters, trainable = [], [], []
    for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        is_adapter = "lora_" in n or "modules_to_save" in n
        (adapters if is_adapter else base).append(p)
        if getattr(p, "requires_grad", False) and isinstance(p, torch.nn.Parameter):
            trainable.append(p)
        base.extend(_quant_tensors(p))
    for m in model.modules():  # bitsandbytes' Linear8bitLt: its first forward moves CB/SCB off the weight into here
        state = getattr(m, "state", None)
        base.extend(t for t in (getattr(state, "CB", None), getattr(state, "SCB", None)) if torch.is_tensor(t))
    for head in heads:
        adapters.extend(head.parameters())
        trainable.extend(q for q in head.parameters() if q.requires_grad)
    return {"base": _tensor_bytes(base), "adapters": _tensor_bytes(adapters), "trainable": _tensor_bytes(trainable)}


def settings(stage, model_dir, quantization="none", **kw) -> Settings:
    base = ModelSpec(name_or_path=model_dir, quantization=quantization, **kw.pop("base", {}))
    return Settings(stage=stage, base=base, lora=kw.pop("lora", LoraSpec()), optim=kw.pop("optim", OptimSpec()),
                    batch_size=kw.pop("batch_size", 2), max_length=kw.pop("max_length", 16), target="cpu", **kw)


def planned(s: Settings) -> dict[str, int]:
    p = estimate_settings(s, budget=None)
    return {c: b for c, b, _ in p.rows + p.off_peak}


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Run one real optimizer step and sum its state tensors (the host-side `step` counters excluded)."""
    params = list(params)
    opt = make_optimizer([(str(i), p) for i, p in enumerate(params)], OptimSpec(optimizer=optimizer))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return _tensor_bytes(v for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step")


# ---------------------------------------------------------------------------------------------- weights: SFT, reward


def check_stage(model_dir, stage, quantization, lora=None):
    lora = lora or LoraSpec()
    task = "score" if stage == "reward" else "causal_lm"
    model = build_model(ModelSpec(name_or_path=model_dir, quantization=quantization), lora, task)
    real = real_split(model)
    got = planned(settings(stage, model_dir, quantization, lora=lora))
    assert got["base weights"] == real["base"]
    assert got["adapters + heads"] == real["adapters"]
    # Gradients: the real ones, after a backward through the model.
    ids = torch.randint(0, 100, (2, 8))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert got["gradients"] == _tensor_bytes(grads) == real["trainable"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert got["optimizer state"] == optimizer_state_bytes(trainable, "adamw")
    return got


@pytest.mark.parametrize("quantization", QUANT)
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_weights_adapters_gradients_optimizer_equal_the_real_tensors(tiny_model_dir, stage, quantization):
    got = check_stage(tiny_model_dir, stage, quantization)
    assert got["base weights"] > 0 and got["gradients"] > 0


def test_partial_targets_and_modules_to_save(tiny_model_dir):
    lora = LoraSpec(r=3, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
    check_stage(tiny_model_dir, "sft", "nf4", lora)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizer_state(tiny_model_dir, optimizer):
    """8-bit state (1 byte + fp32 absmax per 256, fp32 below 4096 elements, shared maps) and 32-bit paged state,
    against bitsandbytes' own step (a wide rank so some LoRA tensors pass the 4096-element threshold)."""
    lora = LoraSpec(r=160)
    model = build_model(ModelSpec(name_or_path=tiny_model_dir), lora, "causal_lm")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.numel() >= 4096 for p in trainable) and any(p.numel() < 4096 for p in trainable)
    p = estimate_settings(settings("sft", tiny_model_dir, lora=lora, optim=OptimSpec(optimizer=optimizer)), budget=None)
    rows = {c: b for c, b, _ in p.rows + p.off_peak}
    key = "optimizer state (paged)" if optimizer.startswith("paged") else "optimizer state"
    assert rows[key] == optimizer_state_bytes(trainable, optimizer)
    if optimizer.startswith("paged"):
        assert rows["optimizer state"] == 0, "paged state is unified memory: shown, not in the allocated peak"


def test_half_precision_true_casts_weights_and_adapters(tiny_model_dir):
    """Lightning's bf16-true casts every floating tensor to bf16: half the fp32 figures."""
    full = planned(settings("sft", tiny_model_dir))
    half = planned(settings("sft", tiny_model_dir, precision="bf16-true"))
    assert half["adapters + heads"] * 2 == full["adapters + heads"]
    assert half["base weights"] * 2 == full["base weights"]


# ---------------------------------------------------------------------------------------------- weights: PPO roles


@pytest.fixture(scope="module")
def role_adapters(tiny_model_dir, tmp_path_factory):
    """An SFT adapter (r=4, every projection) and a reward export (SEQ_CLS r=4 on q/v + score head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lit_ft.models import ALL_PROJECTIONS

    root = tmp_path_factory.mktemp("roles")
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM"))
    rm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    sft.save_pretrained(root / "sft")
    rm.save_pretrained(root / "reward")
    return str(root / "sft"), str(root / "reward")


def check_ppo_roles(model_dir, quantization, sft=None, reward=None, value_model="adapter", stage="ppo"):
    """The roles as the online stage builds them (`online.build_roles`: PPO's value model, or GRPO's "none")."""
    from lit_ft.online import roles
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo_spec import GRPOSpec
    from lit_ft.stages.ppo_spec import PPOSpec

    base, lora = ModelSpec(name_or_path=model_dir, quantization=quantization), LoraSpec(r=6)
    export = adapters.read_reward_export(reward) if reward else None
    model, trainable = roles.build_roles(base, lora, sft, export, value_model)
    roles.AdapterRoles(model, trainable)  # the requires_grad flags the fit uses
    hidden = model.get_base_model().config.hidden_size
    heads = [roles.value_head_from(export, hidden)] if value_model != "none" else []
    if export is not None:
        heads.append(roles.linear_head(hidden, export.head_weight, export.head_bias, trainable=False))
    real = real_split(model, heads)
    spec = {"ppo": PPOSpec()} if stage == "ppo" else {"grpo": GRPOSpec()}
    s = settings(stage, model_dir, quantization, lora=lora, sampling=SamplingSpec(), sft_adapter=sft,
                 reward_adapter=reward, value_model=value_model, **spec)
    got = planned(s)
    assert got["base weights"] == real["base"]
    assert got["adapters + heads"] == real["adapters"]
    assert got["gradients"] == real["trainable"]
    trainable_params = [p for p in model.parameters() if p.requires_grad] + [
        q for head in heads for q in head.parameters() if q.requires_grad]
    assert got["optimizer state"] == optimizer_state_bytes(trainable_params, "adamw")
    return got, real


@pytest.mark.parametrize("quantization", QUANT)
@pytest.mark.parametrize("roles_kind", ["sft+reward", "new-lora", "shared-trunk"])
def test_ppo_roles_equal_the_real_roles(tiny_model_dir, role_adapters, quantization, roles_kind):
    """Policy, frozen reference, frozen reward and trainable value adapters (and heads) on one base."""
    sft, reward = role_adapters if roles_kind == "sft+reward" else (None, None)
    check_ppo_roles(tiny_model_dir, quantization, sft, reward, "shared_trunk" if roles_kind == "shared-trunk" else "adapter")


@pytest.mark.parametrize("quantization,compute", [("none", "bfloat16"), ("nf4", "bfloat16"), ("nf4", "float32")])
def test_the_merged_rollout_copy_is_what_the_engine_allocates(tiny_model_dir, quantization, compute):
    """`sampling.merged`: the plan's copy is `RolloutWeights.bytes_needed` of the roles the stage builds (a 4-bit base:
    de-quantized to the compute dtype); an 8-bit base, which the engine refuses, plans no copy."""
    from lit_ft.online import roles
    from lit_ft.online.engine_ops import RolloutWeights, lora_layers
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.ppo_spec import PPOSpec

    base = dict(quantization=quantization, compute_dtype=compute, dtype="float32")
    model, _ = roles.build_roles(ModelSpec(name_or_path=tiny_model_dir, **base), LoraSpec(r=6), None, None, "adapter")
    real = RolloutWeights.bytes_needed(model, roles.POLICY)
    s = settings("ppo", tiny_model_dir, quantization, base={"compute_dtype": compute, "dtype": "float32"},
                 lora=LoraSpec(r=6), sampling=SamplingSpec(merged=True), ppo=PPOSpec())
    assert planned(s)["merged rollout copy"] == real
    itemsize = getattr(torch, compute if quantization == "nf4" else "float32").itemsize
    layers = [m.base_layer for _, m in lora_layers(model, roles.POLICY)]
    assert layers and real == sum(b.in_features * b.out_features for b in layers) * itemsize
    if quantization == "nf4":  # sampling.dequantize: the same copy, the LoRA left out of it
        d = settings("ppo", tiny_model_dir, quantization, base={"compute_dtype": compute, "dtype": "float32"},
                     lora=LoraSpec(r=6), sampling=SamplingSpec(dequantize=True), ppo=PPOSpec())
        assert planned(d)["de-quantized rollout copy"] == RolloutWeights.bytes_needed(model, roles.POLICY, merge=False)
    refused = estimate_settings(settings("ppo", tiny_model_dir, "int8", sampling=SamplingSpec(merged=True),
                                         ppo=PPOSpec()), budget=None)
    assert "merged rollout copy" not in {c for c, _, _ in refused.rows}
    assert any(n.startswith("sampling.merged: refused with an 8-bit base") for n in refused.notes)


@pytest.mark.parametrize("quantization", QUANT)
@pytest.mark.parametrize("roles_kind", ["sft", "sft+reward", "new-lora"])
def test_grpo_roles_equal_the_real_roles(tiny_model_dir, role_adapters, quantization, roles_kind):
    """GRPO: the trainable policy, the frozen reference copy of the SFT adapter (none without one: the bare base)
    and, when given, the frozen reward adapter and head on one base; no value adapter, no value head."""
    sft = role_adapters[0] if roles_kind != "new-lora" else None
    reward = role_adapters[1] if roles_kind == "sft+reward" else None
    got, real = check_ppo_roles(tiny_model_dir, quantization, sft, reward, "none", stage="grpo")
    assert got["gradients"] == real["trainable"] > 0


@pytest.mark.parametrize("quantization", QUANT)
@pytest.mark.parametrize("with_sft", [True, False], ids=["sft", "new-lora"])
def test_dpo_roles_equal_the_real_module(tiny_model_dir, role_adapters, quantization, with_sft):
    """DPO as `DPOModule.configure_model` builds it: the trainable policy (a copy of the SFT adapter, or a new
    LoRA) and the frozen reference copy on one base."""
    from lit_ft.stages.dpo import DPOModule

    sft, lora = (role_adapters[0] if with_sft else None), LoraSpec(r=6)
    base = ModelSpec(name_or_path=tiny_model_dir, quantization=quantization)
    module = DPOModule(base=base, lora=lora, sft_adapter=sft)
    module.configure_model()
    real = real_split(module.model)
    got = planned(settings("dpo", tiny_model_dir, quantization, lora=lora, sft_adapter=sft, dpo=module.dpo))
    assert (got["base weights"], got["adapters + heads"], got["gradients"]) == \
        (real["base"], real["adapters"], real["trainable"])
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert got["optimizer state"] == optimizer_state_bytes(trainable, "adamw")
    assert planner_shape(settings("dpo", tiny_model_dir, lora=lora, sft_adapter=sft, dpo=module.dpo)).targets == \
        _policy_targets(module.model)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", QUANT)
def test_smollm2_every_stage(smollm2_dir, quantization):
    """The bundled SmolLM2-135M (tied embeddings, 30 layers): SFT, reward, PPO's roles (new policy and value
    adapters) and GRPO's (a new policy, the bare base as reference) against the real quantized models."""
    for stage in ("sft", "reward"):
        check_stage(smollm2_dir, stage, quantization)
    check_ppo_roles(smollm2_dir, quantization)
    check_ppo_roles(smollm2_dir, quantization, value_model="none", stage="grpo")


# ---------------------------------------------------------------------------------------------- activations


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd still holds for the backward when `fn` returns (weights and buffers
    excluded by the callers: they are counted as weights), through `saved_tensors_hooks`. Tensors saved by a graph
    that `fn` builds and frees inside (the fused loss differentiates each chunk in its forward) are not held."""
    import weakref

    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    seen = {}
    for ref in refs:
        t = ref()
        if t is not None:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return seen, out


def adapted(model) -> frozenset:
    """Leaf names of the projections that carry a LoRA in the really built model (what `all` resolved to)."""
    return frozenset(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if len(getattr(m, "lora_A", ())))


def planner_shape(s: Settings) -> act.LoraShape:
    """The LoRA shape the planner reads off its meta-device model for settings `s`."""
    from lit_ft.plan import stages as plan_stages

    return plan_stages.counted_model(s)[3]


def sft_forward_saved(model_dir, dtype, lora, checkpointing=False, rows=3, seq=20, padded=False, every=1):
    from lit_ft.losses import causal_lm_loss

    model = build_model(ModelSpec(name_or_path=model_dir, dtype=dtype, gradient_checkpointing=checkpointing,
                                  checkpoint_every=every), lora)
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    inner = model.get_base_model()
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (rows, seq))
    mask = torch.ones_like(ids)
    if padded:  # right padding on two rows: transformers builds a 4-D mask
        mask[1, seq - 5:] = 0
        mask[2, seq // 2:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100

    def forward():
        h = inner.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return causal_lm_loss(h, inner.get_output_embeddings().weight, labels, chunk_size=16)

    seen, (loss, n) = saved_bytes(forward)
    loss.backward()  # the graph is a real one
    return sum(b for k, b in seen.items() if k not in weights), int(n), inner.config, adapted(model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lora", [LoraSpec(), LoraSpec(dropout=0.0), LoraSpec(r=5, target_modules=["v_proj", "up_proj"])],
                         ids=["all-dropout", "all-no-dropout", "v-up"])
def test_activation_terms_equal_what_autograd_saves(tiny_model_dir, dtype, lora):
    rows, seq = 3, 20
    measured, n_loss, config, targets = sft_forward_saved(tiny_model_dir, dtype, lora, rows=rows, seq=seq)
    d, a = act.Dims.from_config(config), torch.finfo(getattr(torch, dtype)).bits // 8
    # PEFT keeps the adapters in fp32 under a bf16 base and casts each projection's input up (its own copy).
    shape = act.LoraShape(targets, lora.r, lora.dropout > 0, nbytes=4, copies=a != 4)
    assert shape == planner_shape(settings("sft", tiny_model_dir, lora=lora, base={"dtype": dtype}))
    assert len(targets) == (2 if lora.target_modules == ["v_proj", "up_proj"] else 7)
    # CPU dropout keeps its mask in the dtype it runs in (mask_bytes None); no padding, so no 4-D mask.
    trunk = act.trunk_saved(d, rows, seq, a, shape, checkpointing=False)
    assert measured == trunk["layers"] + act.loss_saved(n_loss, rows, seq, d.hidden, a)


@pytest.fixture(scope="module")
def tiny_phi3_dir(tmp_path_factory):
    """A tiny random Phi-3: fused `qkv_proj` and `gate_up_proj`, RoPE through a concatenation."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_phi3")
    Phi3ForCausalLM(Phi3Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
                    ).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_fused_projections_phi3(tiny_phi3_dir, dtype, dropout):
    """Phi-3's fused projections through the planner's own dims and LoRA shape (read off its meta model): `all`
    adapts qkv_proj, o_proj, gate_up_proj and down_proj, sdpa keeps the fused qkv output behind v, and o_proj reads
    a copy of the attention output."""
    from lit_ft.plan import stages as plan_stages

    rows, seq, lora = 3, 20, LoraSpec(dropout=dropout)
    measured, n_loss, _, targets = sft_forward_saved(tiny_phi3_dir, dtype, lora, rows=rows, seq=seq)
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    d, _, _, shape, *_ = plan_stages.counted_model(settings("sft", tiny_phi3_dir, lora=lora, base={"dtype": dtype}))
    assert d.fused_qkv and shape.targets == targets
    a = 4 if dtype == "float32" else 2
    trunk = act.trunk_saved(d, rows, seq, a, shape, checkpointing=False)
    assert measured == trunk["layers"] + act.loss_saved(n_loss, rows, seq, d.hidden, a)


def test_padded_rows_repeat_kv_heads_and_keep_a_mask_per_layer(tiny_model_dir):
    """With padding, sdpa gets repeated KV heads and an additive mask converted per layer (both kept)."""
    rows, seq = 3, 20
    measured, n_loss, config, targets = sft_forward_saved(tiny_model_dir, "float32", LoraSpec(), padded=True)
    d = act.Dims.from_config(config)
    shape = act.LoraShape(targets, 16, True, nbytes=4)
    assert shape == planner_shape(settings("sft", tiny_model_dir))
    trunk = act.trunk_saved(d, rows, seq, 4, shape, checkpointing=False, masked=True)
    assert measured == trunk["layers"] + act.loss_saved(n_loss, rows, seq, d.hidden, 4)
    assert trunk["layers"] > act.trunk_saved(d, rows, seq, 4, shape, checkpointing=False)["layers"]


def online_update_saved(model_dir, stage, dtype, temperature=1.0, value_model="adapter"):
    """(bytes autograd saves in the update forward of one minibatch of left-padded prompts + responses, the module,
    its settings): PPO's `policy_forward`, GRPO's `minibatch_step` forward (`online.logprobs` under the policy)."""
    from lit_ft.online import shared as online, roles
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo import GRPOModule
    from lit_ft.stages.grpo_spec import GRPOSpec
    from lit_ft.stages.ppo import PPOModule
    from lit_ft.online.batch import Rollout
    from lit_ft.stages.ppo_spec import PPOSpec

    mbs, P, R = 4, 12, 6
    base, lora = ModelSpec(name_or_path=model_dir, dtype=dtype), LoraSpec(r=6)
    sampling = SamplingSpec(max_new_tokens=R, temperature=temperature)
    if stage == "ppo":
        spec = {"ppo": PPOSpec(mini_batch_size=mbs)}
        module = PPOModule(base=base, lora=lora, sampling=sampling, value_model=value_model,
                           reward_fn="lit_ft.data.tasks.correctness_reward", **spec)
    else:
        spec = {"grpo": GRPOSpec(mini_batch_size=mbs, samples_per_prompt=2)}
        module = GRPOModule(base=base, lora=lora, sampling=sampling, reward_fn="lit_ft.data.tasks.correctness_reward",
                            **spec)
    module.configure_model()
    module.model.train()
    params = list(module.model.parameters()) + list(module.model.buffers()) + list(getattr(
        module, "value_head", torch.nn.Linear(1, 1)).parameters())
    weights = {t.untyped_storage().data_ptr() for t in params}
    torch.manual_seed(0)
    prompt_mask = torch.ones(mbs, P, dtype=torch.long)
    prompt_mask[1, :3] = 0  # left padding
    response_mask = torch.ones(mbs, R, dtype=torch.long)
    response_mask[2, 4:] = 0  # ended early
    ro = Rollout(torch.randint(0, 100, (mbs, P)), prompt_mask, torch.randint(0, 100, (mbs, R)), response_mask)

    def forward():
        if stage == "ppo":
            return module.policy_forward(ro)
        with module.roles.active(roles.POLICY):
            return online.logprobs(module, ro)

    seen, (logprobs, _, values) = saved_bytes(forward)
    (logprobs.sum() + (values.sum() if values is not None else 0)).backward()  # the graph is a real one
    s = settings(stage, model_dir, lora=lora, sampling=sampling, batch_size=mbs // 2 if stage == "grpo" else mbs,
                 max_length=P, value_model=value_model, base={"dtype": dtype}, **spec)
    return sum(b for k, b in seen.items() if k not in weights), module, s


@pytest.mark.parametrize("stage,dtype,temperature,value_model", [
    ("ppo", "float32", 1.0, "adapter"), ("ppo", "bfloat16", 0.7, "adapter"), ("ppo", "float32", 1.0, "shared_trunk"),
    ("ppo", "bfloat16", 1.0, "shared_trunk"), ("grpo", "float32", 1.0, None), ("grpo", "bfloat16", 1.0, None),
    ("grpo", "float32", 0.7, None)])
def test_online_update_forward_terms_equal_what_autograd_saves(tiny_model_dir, stage, dtype, temperature,
                                                               value_model):
    """The update forward of PPO and GRPO (the policy over a minibatch of prompts + responses, with position ids,
    dropout off; the logits cast to fp32 whatever the base dtype; PPO's shared-trunk value head on the same hidden
    states) saves what `plan_online.policy_saved` says."""
    from lit_ft.plan import online as plan_online, stages as plan_stages

    measured, module, s = online_update_saved(tiny_model_dir, stage, dtype, temperature, value_model or "adapter")
    d = act.Dims.from_config(module.model.get_base_model().config)
    a = 4 if dtype == "float32" else 2
    shape = act.LoraShape(adapted(module.model) if stage == "grpo" else _policy_targets(module.model), 6,
                          dropout=False, nbytes=4, copies=a != 4)  # dropout off in the online stages
    assert shape == planner_shape(s)
    assert measured == plan_online.policy_saved(s, d, a, shape, None, plan_stages._trunk)[0]


def _policy_targets(model) -> frozenset:
    """Leaf names of the projections carrying the policy adapter (PPO also holds a value adapter)."""
    return frozenset(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "policy" in getattr(m, "lora_A", {}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reward_forward_terms_equal_what_autograd_saves(tiny_model_dir, dtype):
    """The reward forward over 2B padded rows with position ids (`scoring.sequence_scores`) saves what
    `plan_stages.reward_saved` says."""
    from lit_ft.plan import stages as plan_stages
    from lit_ft.online import scoring

    pairs, seq, lora = 2, 14, LoraSpec(r=4)
    model = build_model(ModelSpec(name_or_path=tiny_model_dir, dtype=dtype), lora, "score")
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2 * pairs, seq))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    seen, scores = saved_bytes(lambda: scoring.sequence_scores(model, ids, mask))
    measured = sum(b for k, b in seen.items() if k not in weights)
    a = 4 if dtype == "float32" else 2
    s = settings("reward", tiny_model_dir, lora=lora, batch_size=pairs, max_length=seq)
    d = act.Dims.from_config(model.get_base_model().config)
    shape = act.LoraShape(adapted(model), lora.r, True, nbytes=4, copies=a != 4)
    assert shape == planner_shape(settings("reward", tiny_model_dir, lora=lora, base={"dtype": dtype}))
    assert measured == plan_stages.reward_saved(s, d, a, shape, None, head_bytes=4)[0]  # the head is float32
    scores.sum().backward()


def test_checkpointing_keeps_only_layer_inputs_outside(tiny_model_dir):
    """Under checkpointing (reentrant here) the hooks see each checkpointed layer's input [n, H] (kept for the
    recompute) and what is saved outside the layers (the final norm, the loss gather), nothing from inside; RoPE's
    cos/sin travel in the layers' `position_embeddings` argument, held by the checkpoints rather than saved."""
    rows, seq = 3, 20
    measured, n_loss, config, targets = sft_forward_saved(tiny_model_dir, "float32", LoraSpec(), checkpointing=True)
    d = act.Dims.from_config(config)
    trunk = act.trunk_saved(d, rows, seq, 4, act.LoraShape(frozenset(), 16, True), checkpointing=True)
    assert measured == trunk["layers"] - act.rope_saved(d, 1, seq, 4) + act.loss_saved(n_loss, rows, seq, d.hidden, 4)
    full = act.trunk_saved(d, rows, seq, 4, act.LoraShape(targets, 16, True), False)
    assert trunk["layers"] < full["layers"] / 3


def test_checkpointing_every_kth_layer_saves_between_none_and_all_with_the_same_gradients(tiny_model_dir):
    """`checkpoint_every: 2` on the 2-layer tiny Llama: layer 0 checkpointed (its input kept), layer 1 keeps its own
    saved tensors, byte for byte as the planner counts them; the loss and every LoRA gradient equal the run without
    checkpointing; the auto lever tries every 4th, every 2nd, then every layer."""
    rows, seq = 3, 20
    spec = LoraSpec(dropout=0.0)
    measured, n_loss, config, targets = sft_forward_saved(tiny_model_dir, "float32", spec, checkpointing=True, every=2)
    d = act.Dims.from_config(config)
    shape = act.LoraShape(targets, spec.r, False)
    half = act.trunk_saved(d, rows, seq, 4, shape, checkpointing=True, every=2)
    assert measured == half["layers"] + act.loss_saved(n_loss, rows, seq, d.hidden, 4)
    full = act.trunk_saved(d, rows, seq, 4, shape, checkpointing=True)["layers"]
    none = act.trunk_saved(d, rows, seq, 4, shape, checkpointing=False)["layers"]
    assert full < half["layers"] < none

    def grads(**base):
        torch.manual_seed(0)
        model = build_model(ModelSpec(name_or_path=tiny_model_dir, dtype="float32", **base), LoraSpec(dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.train()
        ids = torch.randint(0, 100, (rows, seq), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = build_model(ModelSpec(name_or_path=tiny_model_dir, gradient_checkpointing=True, checkpoint_every=2),
                        LoraSpec())
    assert [layer.gradient_checkpointing for layer in model.get_base_model().get_decoder().layers] == [True, False]
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_ft.models.load import checkpoint_every_kth

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))
    if hasattr(gpt2, "activation_checkpointing_enable"):  # transformers' newer name (the old one is deprecated)
        gpt2.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        gpt2.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint_every_kth(gpt2, 2)  # a family whose blocks are not `layers` (GPT-2's `h`)
    assert [block.gradient_checkpointing for block in gpt2.transformer.h] == [True, False, True, False]
    plain_loss, plain = grads()
    kth_loss, kth = grads(gradient_checkpointing=True, checkpoint_every=2)
    torch.testing.assert_close(kth_loss, plain_loss)
    assert plain.keys() == kth.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(kth[n], plain[n])
    s = settings("sft", tiny_model_dir)
    levers = [args for _, args, _, kind in plan.levers(s) if kind == "checkpointing"]
    assert levers == [["--model.base.gradient_checkpointing", "true", "--model.base.checkpoint_every", "4"],
                      ["--model.base.gradient_checkpointing", "true", "--model.base.checkpoint_every", "2"],
                      ["--model.base.gradient_checkpointing", "true"]]
    with pytest.raises(ConfigError, match=r"model.base.checkpoint_every=0: expected an integer >= 1"):
        ModelSpec(checkpoint_every=0)


def test_kv_cache_equals_a_static_cache(tiny_model_dir):
    from transformers import AutoConfig, StaticCache

    config = AutoConfig.from_pretrained(tiny_model_dir)
    cache = StaticCache(config=config, max_cache_len=24)
    ids = torch.zeros(5, 1, dtype=torch.long)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model(input_ids=ids, past_key_values=cache, use_cache=True)  # allocates the cache lazily
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert act.kv_cache(act.Dims.from_config(config), 5, 24, 4) == real


def test_rollout_engine_row_equals_the_decode_engine(tiny_model_dir):
    """The planned "KV cache (rollout)" of a GRPO run equals every tensor a real static `DecodeEngine` keeps (its
    `StaticCache` and step buffers) after a validation rollout of eval_batch_size prompts and a training rollout of
    batch_size x samples_per_prompt rows (the engine keeps the larger of the two); hf generate keeps none."""
    import dataclasses

    from lit_ft.online import roles
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo_spec import GRPOSpec
    from lit_ft.online.sampler import Sampler

    B, k, P, R, eval_rows = 3, 2, 9, 5, 8
    model, _ = roles.build_roles(ModelSpec(name_or_path=tiny_model_dir, dtype="bfloat16"), LoraSpec(r=4), None, None,
                                 "none")
    sampler, spec = Sampler(model, 2, 2), SamplingSpec(max_new_tokens=R, engine="static")
    torch.manual_seed(0)
    for rows, width in ((eval_rows, P - 2), (B * k, P)):  # the sanity-check validation first, then a rollout
        ids = torch.randint(3, 100, (rows, width))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        sampler(ids, mask, spec)
    engine = sampler.engine
    real = _tensor_bytes([t for layer in engine.cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
                         + [t for t in vars(engine).values() if torch.is_tensor(t)])
    s = dataclasses.replace(settings("grpo", tiny_model_dir, lora=LoraSpec(r=4), sampling=spec, batch_size=B,
                                     max_length=P, eval_batch_size=eval_rows, grpo=GRPOSpec(samples_per_prompt=k),
                                     base={"dtype": "bfloat16"}), target="cuda")
    assert planned(s)["KV cache (rollout)"] == real
    assert planned(dataclasses.replace(s, sampling=dataclasses.replace(spec, engine="hf")))["KV cache (rollout)"] == 0


# ---------------------------------------------------------------------------------------------- plan, CLI, advice


def test_estimate_reads_the_objects_of_a_fit(tiny_model_dir):
    import lightning as L

    from lit_ft.data.modules import InstructionDataModule
    from lit_ft.stages.sft import SFTModule

    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir, gradient_checkpointing=True),
                       lora=LoraSpec(r=8), loss_chunk_size=512)
    dm = InstructionDataModule(train_file="data/demo/sft_train.jsonl", tokenizer=tiny_model_dir, batch_size=3,
                               max_length=64, packing=True)
    trainer = L.Trainer(precision="bf16-true", accumulate_grad_batches=4, logger=False, accelerator="cpu",
                        enable_checkpointing=False)
    s = plan.settings_from(module, dm, trainer)
    assert (s.stage, s.batch_size, s.max_length, s.packing, s.precision, s.accumulate_grad_batches,
            s.loss_chunk_size, s.lora.r, s.base.gradient_checkpointing) == \
        ("sft", 3, 64, True, "bf16-true", 4, 512, 8, True)
    assert module.model is None, "planning builds nothing on the module"


def test_cli_reads_the_config_as_fit_and_advises(smollm2_dir, capsys):
    """`lit-ft plan --config configs/sft.yaml --budget 1GiB`: the shipped config (the bundled
    SmolLM2, from its cached directory) does not fit in 1 GiB, and the advice lists the overrides to use."""
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "budget 1.00 GiB: DOES NOT FIT" in out and "cheapest changes" in out
    assert "--data.batch_size" in out and "--model.base.gradient_checkpointing true" in out


@pytest.mark.parametrize("config", ["configs/sft.yaml", "configs/grpo.yaml"])
def test_advice_totals_are_the_plans_of_the_changed_configs(tiny_model_dir, config):
    """Each advised change, applied through the CLI as an override, plans exactly the total the advice shows."""
    args = ["--config", config, "--model.base.name_or_path", tiny_model_dir, "--data.max_length", "256",
            "--data.batch_size", "16"]
    target = "cuda" if "grpo" in config else "cpu"  # on CUDA the rollout engine is planned, and hf advised
    first = plan_cli.plan_from_cli(args, budget="1MiB", target=target)
    assert first.fits is False and first.advice
    for what, overrides, total, fits in first.advice:
        again = plan_cli.plan_from_cli(args + overrides, budget="1MiB", target=target)
        assert again.total == total, what
    assert first.advice[0][2] < first.total  # the micro-batch change lowers the peak


def test_cli_plans_grpo(tiny_model_dir, capsys):
    """`lit-ft plan --config configs/grpo.yaml`: the GRPO stage, its rollout engine and minibatch advice
    in the spec's own keys (manual optimization: no Trainer accumulation)."""
    assert plan_cli.main(["--config", "configs/grpo.yaml", "--model.base.name_or_path", tiny_model_dir, "--device", "cuda",
                      "--budget", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: grpo on cuda" in out and "KV cache (rollout)" in out and "DOES NOT FIT" in out
    # nothing fits 1 MiB: the smallest minibatch, 64 -> 1 with 64 accumulated (configs/grpo.yaml: 64, 1)
    assert "--model.grpo.mini_batch_size 1 --model.grpo.gradient_accumulation_steps 64" in out
    assert "--model.sampling.engine hf" in out and "accumulate_grad_batches" not in out


def test_engine_static_is_planned_on_the_cpu_too(tiny_model_dir):
    """`sampling.engine: static` decodes with the engine on any device (eagerly off CUDA): its cache is planned as
    resident; `auto` on the CPU uses `generate`, whose cache is freed after the rollout."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo_spec import GRPOSpec

    def kv(engine):
        p = estimate_settings(settings("grpo", tiny_model_dir, sampling=SamplingSpec(engine=engine), grpo=GRPOSpec()),
                              budget=None)
        return next((b, how) for c, b, how in p.rows if c == "KV cache (rollout)")

    static, auto = kv("static"), kv("auto")
    assert static[0] > 0 and "static engine: resident" in static[1]
    assert auto[0] == 0 and "(hf: freed)" in auto[1]


def test_the_planned_prefill_runs_each_distinct_prompt_once(tiny_model_dir):
    """16 rollout rows as 4 prompts x 4 samples: the prefill's forward over 4 prompts (plus their own KV cache in
    the static engine), against 16 prompts x 1 sample; a validation batch of 16 distinct prompts plans 16."""
    import dataclasses

    from lit_ft.online.generation import SamplingSpec
    from lit_ft.plan import online
    from lit_ft.plan.stages import counted_model
    from lit_ft.stages.grpo_spec import GRPOSpec

    def prefill(batch, k, evaluated=None, engine="static"):
        grpo = GRPOSpec(samples_per_prompt=k, mini_batch_size=4, advantage="grpo" if k > 1 else "reinforce_pp")
        s = settings("grpo", tiny_model_dir, batch_size=batch, eval_batch_size=evaluated,
                     sampling=SamplingSpec(engine=engine, max_new_tokens=8), grpo=grpo)
        s = dataclasses.replace(s, validation=evaluated is not None)
        d = counted_model(s)[0]
        rows, erows, P, R, _ = online.shapes(s)
        return online.prefill_bytes(s, d, 4, rows, erows, P, R, engine == "static"), d, P

    shared, d, P = prefill(4, 4)
    alone = prefill(16, 1)[0]
    fwd = lambda n: act.nograd_forward(d, n * P, 4) + n * d.vocab * 8  # noqa: E731
    own = act.kv_cache(d, 4, P, 4) + 4 * P * P + act.kv_cache(d, 16, P, 4) // d.layers + 16 * d.vocab * 4
    assert alone - shared == fwd(16) - fwd(4) - own > 0
    assert prefill(4, 4, engine="hf")[0] == alone - fwd(16) + fwd(4)  # generate shares it too, in its own cache
    assert prefill(4, 4, evaluated=4)[0] == shared  # 4 validation prompts padded to 16 rows with copies: shared
    assert prefill(4, 4, evaluated=16)[0] == alone  # 16 distinct validation prompts: the larger prefill


def test_the_engine_keeps_validation_rows_only_where_the_fit_validates(tiny_model_dir):
    """The static engine's cache holds the larger of the rollout and the validation batch (it keeps the largest
    shape it has seen); with validation off (`limit_val_batches: 0`, the GRPO recipe's) only the rollout's rows."""
    import dataclasses

    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo_spec import GRPOSpec

    s = settings("grpo", tiny_model_dir, sampling=SamplingSpec(engine="static", max_new_tokens=8),
                 grpo=GRPOSpec(samples_per_prompt=2, mini_batch_size=4), eval_batch_size=64)
    how = {v: next(h for c, _, h in estimate_settings(dataclasses.replace(s, validation=v), budget=None).rows
                   if c == "KV cache (rollout)") for v in (True, False)}
    assert how[True].startswith("64 rows x") and how[False].startswith("4 rows x"), how


@pytest.mark.parametrize("window, kv", [(4096, "static engine: resident"), (12, "(hf: freed)")])
def test_auto_plans_generate_where_a_sliding_window_is_shorter_than_the_rollout(tmp_path, window, kv):
    """On CUDA `engine: auto` decodes a sliding-window model with the static engine only where the window covers
    prompt + new tokens (`Sampler.resolve`); the plan decides the same: 16 + 8 tokens against windows of 4096 and
    12."""
    import dataclasses

    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo_spec import GRPOSpec
    from tests.family_models import make_family_model

    make_family_model("mistral", str(tmp_path), vocab_size=64)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": window}))
    s = settings("grpo", str(tmp_path), sampling=SamplingSpec(engine="auto", max_new_tokens=8), grpo=GRPOSpec())
    p = estimate_settings(dataclasses.replace(s, target="cuda"), budget=None)
    assert kv in next(how for c, _, how in p.rows if c == "KV cache (rollout)")


def test_over_budget_advice_reaches_a_fit(tiny_model_dir):
    s = settings("sft", tiny_model_dir, batch_size=16, max_length=256)
    p = estimate_settings(s, budget=None)
    budget = int(p.total * 0.6)
    over = estimate_settings(s, budget=budget)
    assert over.fits is False
    assert any(fits for _, _, _, fits in over.advice)
    assert estimate_settings(s, budget=p.total).advice == []


def test_bad_budget_and_missing_model_are_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--budget='lots'"):
        plan.parse_size("lots")
    assert plan.parse_size("24GiB") == 24 * 2**30 and plan.parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ConfigError, match="model.base.name_or_path"):
        estimate_settings(settings("sft", "nobody/no-such-model-here"), budget=None)
    with pytest.raises(ConfigError, match="local path /no/such/dir does not exist"):
        estimate_settings(settings("sft", "/no/such/dir"), budget=None)
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "lots"]) == 2


def test_config_json_alone_is_enough(tiny_model_dir, tmp_path):
    import shutil

    shutil.copy(f"{tiny_model_dir}/config.json", tmp_path / "config.json")
    assert planned(settings("sft", str(tmp_path / "config.json"))) == planned(settings("sft", tiny_model_dir))
    assert planned(settings("sft", str(tmp_path))) == planned(settings("sft", tiny_model_dir))


def test_json_output(tiny_model_dir, capsys):
    assert plan_cli.main(["--config", "configs/reward.yaml", "--model.base.name_or_path", tiny_model_dir,
                      "--budget", "80GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "reward" and out["total"] <= out["budget"] and out["advice"] == []
    assert out["peak"] == sum(out["components"].values())


# ---------------------------------------------------------------------------------------------- fit log, benchmark


def test_memory_plan_log_at_the_start_of_a_fit(tiny_model_dir, tmp_path, caplog):
    """One plan line at setup of a real (tiny, CPU) fit, the same figure `estimate` gives for its objects."""
    import logging

    import lightning as L

    from lit_ft.data.modules import InstructionDataModule
    from lit_ft.plan import MemoryPlanLog
    from lit_ft.stages.sft import SFTModule

    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4))
    dm = InstructionDataModule(train_file="data/demo/sft_train.jsonl", tokenizer=tiny_model_dir, batch_size=2,
                               max_length=64)
    callback = MemoryPlanLog(budget="1GiB")
    trainer = L.Trainer(max_steps=1, logger=False, accelerator="cpu", enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[callback],
                        default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan: peak")]
    assert len(lines) == 1 and "of 1.00 GiB (fits)" in lines[0]
    expected = plan.estimate(SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4)), dm, trainer,
                             budget="1GiB", target="cpu")
    assert callback.plan.peak == expected.peak
    assert callback.measured is None  # measured only on CUDA


def test_memory_plan_log_never_stops_a_fit(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_ft.plan import MemoryPlanLog

    callback = MemoryPlanLog()
    trainer = L.Trainer(max_steps=1, logger=False, accelerator="cpu", enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[callback],
                        default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="memory plan: not available"):
        trainer.fit(BoringModel())
    assert callback.plan is None


def test_plan_vs_measured_prints_the_plan_on_a_cpu(tiny_model_dir, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "plan_vs_measured.py"
    spec = importlib.util.spec_from_file_location("plan_vs_measured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--config", "configs/sft.yaml", "--config", "configs/reward.yaml", "--steps", "2",
                       "--model.base.name_or_path", tiny_model_dir]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["config"] for x in lines] == ["configs/sft.yaml", "configs/reward.yaml"]
    for x in lines:
        assert x["measured_peak"] is None and x["planned_peak"] == sum(x["components"].values()) > 0


def test_hub_id_from_the_local_cache_only(tiny_model_dir, tmp_path):
    """A hub id is read from the local hub cache (a snapshot holding only config.json), never downloaded."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(f"{tiny_model_dir}/config.json", snapshot / "config.json")
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    code = ("import sys\nfrom lit_ft.plan import Settings, estimate_settings\nfrom lit_ft.models import ModelSpec, LoraSpec\n"
            "from lit_ft.train.optim import OptimSpec\nfrom lit_ft.errors import ConfigError\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        print(estimate_settings(Settings('sft', ModelSpec(name_or_path=name), LoraSpec(), OptimSpec(), 2, 16,"
            " target='cpu'), budget=None).peak)\n"
            "    except ConfigError as e:\n"
            "        print('error:', e)\n")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, "someone/tiny", "someone/absent"], env=env, capture_output=True,
                         text=True, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found, absent = out.stdout.strip().splitlines()[-2:]
    assert int(found) == estimate_settings(settings("sft", tiny_model_dir), budget=None).peak
    assert absent.startswith("error: model.base.name_or_path: no config for 'someone/absent'")


# ---------------------------------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def wider_teacher_dir(tiny_model_dir, tmp_path_factory):
    """A different tiny Llama of the same tokenizer: 3 layers, hidden 48 (the student's: 2, 32)."""
    from tests.conftest import make_tiny_llama
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(d)
    make_tiny_llama(str(d), vocab_size=len(tok), seed=3, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    return str(d)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("teacher_kind", ["adapter", "model"])
def test_distill_student_and_teacher_equal_the_real_module(tiny_model_dir, role_adapters, wider_teacher_dir,
                                                           quantization, teacher_kind):
    """`DistillModule.configure_model`: the trainable student LoRA (and its frozen teacher adapter) on one base;
    a separate teacher's weights counted exactly as `load_base` holds them (quantized like a base), in its own
    row."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.distill import DistillModule

    lora = LoraSpec(r=6)
    base = ModelSpec(name_or_path=tiny_model_dir, quantization=quantization)
    teacher = ModelSpec(name_or_path=wider_teacher_dir, quantization=quantization) if teacher_kind == "model" else None
    adapter = role_adapters[0] if teacher_kind == "adapter" else None
    module = DistillModule(base=base, lora=lora, teacher=teacher, teacher_adapter=adapter)
    module.configure_model()
    real = real_split(module.model)
    s = settings("distill", tiny_model_dir, quantization, lora=lora, sampling=SamplingSpec(), distill=module.distill,
                 teacher=teacher, teacher_adapter=adapter)
    got = planned(s)
    assert (got["base weights"], got["adapters + heads"], got["gradients"]) == \
        (real["base"], real["adapters"], real["trainable"])
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert got["optimizer state"] == optimizer_state_bytes(trainable, "adamw")
    if teacher is None:
        assert got["teacher weights"] == 0 and "teacher" in module.model.peft_config
    else:
        t = real_split(module.teacher_model)
        assert got["teacher weights"] == t["base"] + t["adapters"] > 0
        assert got["teacher weights"] != got["base weights"]  # another model's shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distill_chunk_saves_what_the_plan_counts(monkeypatch, dtype, beta, temperature):
    """One chunk of `chunked_generalized_jsd` under grad (its checkpoint made a plain call, so the tensors it
    re-creates in the backward stay held): the saved bytes, the heads' weights aside, equal
    `online.distill_chunk_saved`; the chunk's transient is those plus the gradients' [chunk, V]."""
    import lit_ft.losses.distill as distill_loss
    from lit_ft.losses import chunked_generalized_jsd
    from lit_ft.plan import online

    monkeypatch.setattr(distill_loss, "checkpoint", lambda fn, *a, **k: fn(*a))
    n, H, Ht, V = 13, 16, 24, 97
    head_s = torch.nn.Linear(H, V, bias=False).to(dtype).requires_grad_(False)
    head_t = torch.nn.Linear(Ht, V, bias=False).to(dtype).requires_grad_(False)
    h_s = torch.randn(n, H, dtype=dtype, requires_grad=True)
    h_t = torch.randn(n, Ht, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for p in (head_s.weight, head_t.weight)}
    # with `targets` (DistillModule's mismatch figures, as the stage calls it: width given) no more is saved
    for targets in (torch.randint(0, V, (n,)), None):
        seen, (jsd, _, _) = saved_bytes(lambda: chunked_generalized_jsd(
            h_s, h_t, lambda h: head_s(h).float(), lambda h: head_t(h).float(), beta, temperature, chunk_size=n,
            width=V, targets=targets, target_temperature=0.8))
        got = sum(b for ptr, b in seen.items() if ptr not in weights)
        assert got == online.distill_chunk_saved(n, V, beta)
    jsd.sum().backward()
    assert h_s.grad is not None


def test_distill_update_phase_grows_with_the_chunk_and_the_teacher(tiny_model_dir, wider_teacher_dir):
    """The divergence's chunk is `model.distill.logits_chunk_size` tokens, at most the minibatch's response
    tokens; a separate teacher's hidden states [rows, R, Ht] ride on the rollout record."""
    import dataclasses

    from lit_ft.online.generation import SamplingSpec
    from lit_ft.plan import online
    from lit_ft.plan import weights as pw
    from lit_ft.stages.distill_spec import DistillSpec

    R = 8
    s = settings("distill", tiny_model_dir, sampling=SamplingSpec(max_new_tokens=R), batch_size=4,
                 distill=DistillSpec(mini_batch_size=4, logits_chunk_size=4), teacher_adapter="missing")
    small = planned(s)
    big = planned(dataclasses.replace(s, distill=DistillSpec(mini_batch_size=4, logits_chunk_size=1024)))
    V = pw.model_config(s.base).vocab_size
    key = [k for k in small if k.startswith("activations (peak phase: update")]
    assert key, small
    grow = big[key[0]] - small[key[0]]
    assert grow == online.distill_transient(4 * R, V, 0.5, 4) - online.distill_transient(4, V, 0.5, 4)
    other = planned(dataclasses.replace(s, teacher=ModelSpec(name_or_path=wider_teacher_dir), teacher_adapter=None))
    assert other["rollout buffers"] - small["rollout buffers"] == 4 * R * (48 - 32) * 4


def test_cli_plans_distill(tiny_model_dir, capsys):
    """`lit-ft plan --config configs/distill.yaml`: the distillation stage's table (the teacher adapter not yet
    trained: assumed to be the student's LoRA) and the divergence chunk among the advice."""
    assert plan_cli.main(["--config", "configs/distill.yaml", "--model.base.name_or_path", tiny_model_dir,
                          "--model.teacher_adapter", "/nonexistent/adapter", "--budget", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: distill on" in out and "teacher weights" in out and "rollout buffers" in out
    assert "DOES NOT FIT" in out and "--model.distill.mini_batch_size" in out


# ---------------------------------------------------------------------------------------------- KTO


def kto_settings(model_dir, **kw):
    from lit_ft.plan.rows import RowStats
    from lit_ft.stages.kto import KTOSpec

    data = RowStats(longest=12, eval_longest=10, mismatched=20, eval_mismatched=14, count=30)
    return settings("kto", model_dir, batch_size=4, max_length=16, kto=kw.pop("kto", KTOSpec()), data=data, **kw)


@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("validation", [True, False])
def test_kto_plans_its_no_grad_passes(tiny_model_dir, precompute, validation):
    """KTO's section: the policy over the B examples (their longest row, 12), and beside it the largest of the no-grad
    passes, each run alone: the reference over the examples (none with `precompute_ref`: its pass over
    `ref_batch_size` rows of the longest training or validation row runs once before training instead), the
    mismatched pairs (longest prompt + longest completion, 20, cut to max_length 16), and validation over the eval
    batch (its rows 10, its mismatched pairs 14); the table's host-side reference is an int64 key and an fp32
    log-prob an example read (30), off the peak."""
    import dataclasses

    from lit_ft.plan import stages, weights as pw
    from lit_ft.plan.activations import Dims
    from lit_ft.stages.kto import KTOSpec

    spec = KTOSpec(precompute_ref=precompute, logp_chunk_size=8, ref_batch_size=3)
    s = kto_settings(tiny_model_dir, kto=spec, eval_batch_size=6, validation=validation)
    got = planned(s)
    d = Dims.from_config(pw.model_config(s.base))
    policy = got["activations (saved, examples)"] + got["activations (backward peak)"]
    want = {"mismatched pairs": stages.logps_nograd(d, 4 * 16, 8, 4)}
    if precompute:
        want["precomputing the reference"] = stages.logps_nograd(d, 3 * 12, 8, 4)
    else:
        want["reference"] = stages.logps_nograd(d, 4 * 12, 8, 4)
    if validation:
        want["validation"] = max(stages.logps_nograd(d, 6 * 10, 8, 4), stages.logps_nograd(d, 6 * 14, 8, 4))
    assert stages.kto_passes(s, d, 4) == {k: (v, stages.kto_passes(s, d, 4)[k][1]) for k, v in want.items()}
    top = max(want, key=want.get)
    assert got[f"no-grad passes (largest: {top})"] == max(0, want[top] - policy)
    assert ("reference table (host)" in got) == precompute
    if precompute:
        assert got["reference table (host)"] == 30 * 12
    assert planned(dataclasses.replace(s, data=None))  # without data: every row and pair max_length
    assert stages.kto_passes(dataclasses.replace(s, data=None), d, 4)["mismatched pairs"][1] == "4 x 16"


def test_kto_validation_batch_can_set_the_peak(tiny_model_dir):
    """A validation batch many times the training micro-batch: its no-grad passes exceed the policy's
    activations, and the difference shows in the row (the training alone would not)."""
    import dataclasses

    s = kto_settings(tiny_model_dir, eval_batch_size=200)
    got = planned(s)
    assert got["no-grad passes (largest: validation)"] > 0
    off = planned(dataclasses.replace(s, validation=False))
    assert sum(got.values()) > sum(off.values())


def test_kto_reads_its_spec_and_the_trainers_validation(tiny_model_dir):
    """`settings_from` carries `KTOModule.kto` and whether the Trainer validates (`limit_val_batches` 0: no)."""
    import lightning as L

    from lit_ft.stages.kto import KTOModule, KTOSpec

    module = KTOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4),
                       kto=KTOSpec(precompute_ref=True, logp_chunk_size=64))
    s = plan.settings_from(module, None, L.Trainer(accelerator="cpu", limit_val_batches=0, logger=False), "cpu")
    assert s.kto.precompute_ref and s.kto.logp_chunk_size == 64 and not s.validation
    assert plan.settings_from(module, None, L.Trainer(accelerator="cpu", logger=False), "cpu").validation


def test_cli_plans_kto(tiny_model_dir, capsys):
    """`lit-ft plan --config kto` (the recipe by name): the KTO section (the examples, the no-grad passes with the
    mismatched pairs, the reference and the 50-row validation batch) and, over budget, the micro-batch advice
    stopping at 2 rows; with `precompute_ref` the reference's pass before training and its host table."""
    from lit_ft.data.recipes import resolve_config_args  # what `lit-ft plan` does to a recipe's name

    assert plan_cli.main(resolve_config_args(["--config", "kto", "--model.base.name_or_path", tiny_model_dir,
                                              "--model.sft_adapter", "/nonexistent/adapter", "--budget", "1MiB"])) == 0
    out = capsys.readouterr().out
    assert "memory plan: kto on" in out and "activations (saved, examples)" in out
    line = next(x for x in out.splitlines() if "no-grad passes (largest:" in x)
    assert "mismatched pairs 16 x" in line and "reference 16 x" in line and "validation 50 x" in line
    assert "DOES NOT FIT" in out and "--data.batch_size 2" in out and "--data.batch_size 1 " not in out
    assert plan_cli.main(resolve_config_args([
        "--config", "kto", "--model.base.name_or_path", tiny_model_dir, "--model.sft_adapter", "/nonexistent/adapter",
        "--model.kto.precompute_ref", "true", "--trainer.limit_val_batches", "0"])) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "no-grad passes (largest:" in x)
    assert "precomputing the reference 16 x" in line and "validation" not in line and "reference table (host)" in out


# ---------------------------------------------------------------------------------------------- distillation validation


def test_distill_validation_phase_is_what_its_rules_say(tiny_model_dir):
    """`DistillModule.validation_step`: E eval prompts (`eval_batch_size`), greedy, one response each; the
    validation phase is its record beyond the training one (prompt ids and masks, responses, the teacher's hidden
    states [E, R, H]; no sampler log-probs) plus the larger of the teacher's pass (minibatch rows at a time) and the
    student's no-grad divergence over all E rows at once (trunk output [E, P + R, H], both gathered response states,
    one chunk's `NOGRAD_DIVERGENCE` fp32 work and the head's output). A large eval batch makes it the peak; without
    validation (limit_val_batches 0) it is not planned."""
    import dataclasses

    from lit_ft.online.generation import SamplingSpec
    from lit_ft.plan import online, weights as pw
    from lit_ft.plan.activations import Dims, nograd_forward
    from lit_ft.stages.distill_spec import DistillSpec

    R, P, E, B, mbs, chunk = 8, 16, 64, 4, 4, 32
    s = settings("distill", tiny_model_dir, sampling=SamplingSpec(max_new_tokens=R), batch_size=B,
                 eval_batch_size=E, distill=DistillSpec(mini_batch_size=mbs, logits_chunk_size=chunk),
                 teacher_adapter="missing")
    got = planned(s)
    d = Dims.from_config(pw.model_config(s.base))
    H, V, n, seq = d.hidden, d.vocab, E * R, P + R
    record = B * (2 * P + 2 * R) * 8 + B * R * 4 + B * R * H * 4
    assert got["rollout buffers"] == record
    val_record = E * (2 * P + 2 * R) * 8 + E * R * H * 4
    teacher = nograd_forward(d, mbs * seq, 4) + mbs * seq * H * 4
    student = max(nograd_forward(d, E * seq, 4), E * seq * H * 4 + 2 * n * H * 4 + chunk * V * (8 * 4 + 4))
    assert got["activations (peak phase: validation)"] == val_record - record + max(teacher, student)
    how = {c: h for c, _, h in estimate_settings(s, budget=None).rows}["activations (peak phase: validation)"]
    assert f"validation: {E} greedy rollouts" in how
    off = planned(dataclasses.replace(s, validation=False))
    assert not any("validation" in k for k in off)
    small = planned(dataclasses.replace(s, eval_batch_size=B))
    assert not any("validation" in k for k in small)  # the training update is the larger there
    assert online.distill_validation(dataclasses.replace(s, eval_batch_size=B), d, 4,
                                     online.teacher_plan(s, d, 4), record) > 0


def test_cli_plans_distill_validation(tiny_model_dir, capsys):
    """`lit-ft plan --config distill`: configs/distill.yaml runs no validation rollouts (limit_val_batches 0) and
    the table says so; with `--trainer.limit_val_batches 1` they are planned (the 32-prompt eval batch: its
    phase's bytes in the activations row, the largest of the phases its peak)."""
    from lit_ft.data.recipes import resolve_config_args  # what `lit-ft plan` does to a recipe's name

    base = resolve_config_args(["--config", "distill", "--model.base.name_or_path", tiny_model_dir,
                                "--model.teacher_adapter", "/nonexistent/adapter"])
    assert plan_cli.main(base) == 0
    out = capsys.readouterr().out
    assert "no validation (trainer.limit_val_batches 0)" in out and "peak phase: validation" not in out
    assert plan_cli.main([*base, "--trainer.limit_val_batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "validation: greedy rollouts of the eval batch" in out and "; validation: 32 greedy rollouts" in out


def test_cli_says_what_fit_memory_auto_would_run(smollm2_dir, capsys):
    """`lit-ft plan` also prints `fit --memory auto`'s choice for the budget, as overrides: the shipped SFT config
    at 1 GiB on the CPU gets changes whose planned total fits; on a GPU with a budget to spare, a run of many steps
    gets its steps replayed from CUDA graphs, or compiled layers where graphs are off; a budget nothing fits names the
    smallest that would."""
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "1GiB"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fit --memory auto (1.00 GiB): ") and "(as overrides: --" in line, line
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "80GiB", "--device", "cuda",
                          "--trainer.max_steps", "100000", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto"]
    assert "CUDA graphs" in auto["changes"] and auto["overrides"][-2:] == ["--model.cuda_graphs", "true"]
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "80GiB", "--device", "cuda",
                          "--trainer.max_steps", "100000", "--model.cuda_graphs", "false", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto"]
    assert "compiled decoder layers" in auto["changes"] and auto["overrides"][-2:] == ["--model.compile", "true"]
    assert plan_cli.main(["--config", "configs/sft.yaml", "--budget", "1KiB"]) == 0
    assert "memory: nothing fits 1.00 KiB" in capsys.readouterr().out
