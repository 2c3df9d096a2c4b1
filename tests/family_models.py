"""Tiny random instances of the text-only causal-LM families in the installed transformers (built from their
configs, no downloads), with realistic logit sizes and non-zero LM-head biases where the family has them."""

from __future__ import annotations

import torch

# family -> (config overrides, the decoder projections LoRA must adapt by default, written out by hand)
LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
FAMILIES: dict[str, tuple[dict, set[str]]] = {
    "llama": ({}, LLAMA),
    "mistral": ({}, LLAMA),
    "qwen2": ({}, LLAMA),
    "qwen3": ({}, LLAMA),
    "gemma2": ({"final_logit_softcapping": 30.0}, LLAMA),
    "gemma3_text": ({"final_logit_softcapping": 30.0}, LLAMA),
    "phi": ({}, {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    "phi3": ({}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "falcon": ({"new_decoder_architecture": False}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "gpt2": ({}, {"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": ({}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "gptj": ({"rotary_dim": 4}, {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}),
    "opt": ({}, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    "starcoder2": ({}, {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}),
    "granite": ({"logits_scaling": 8.0}, LLAMA),
    "granitemoe": ({"logits_scaling": 8.0}, ATTN),
    "cohere": ({"logit_scale": 0.0625}, LLAMA),
    "mixtral": ({}, ATTN),
    "qwen2_moe": ({}, LLAMA),  # its shared expert is a plain MLP; shared_expert_gate is a gate, never adapted
    "qwen3_moe": ({}, ATTN),
    "olmo2": ({}, LLAMA),
    "stablelm": ({}, LLAMA),
    "smollm3": ({}, LLAMA),
    "bloom": ({}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}

_COMMON = dict(
    vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4,
    n_positions=256, n_inner=128, ffn_dim=128, word_embed_proj_dim=64, num_local_experts=4, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, decoder_start_token_id=None,
)


def family_config(family: str, vocab_size: int):
    from transformers import CONFIG_MAPPING

    overrides, _ = FAMILIES[family]
    cls = CONFIG_MAPPING[family]
    default = cls()
    wanted = {**_COMMON, "vocab_size": vocab_size, **overrides}
    for key in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "activation_dropout", "summary_first_dropout"):
        wanted[key] = 0.0  # the loss comparisons need a deterministic model
    kwargs = {}
    for key, value in wanted.items():
        if value is None or not (hasattr(default, key) or key in getattr(default, "attribute_map", {})):
            continue
        if isinstance(getattr(type(default), key, None), property):
            continue  # derived (Falcon's head_dim)
        if key in wanted and isinstance(getattr(default, key, None), float) != isinstance(value, float) and "drop" in key:
            continue
        kwargs[key] = value
    cfg = cls(**kwargs)
    return cfg


def make_family_model(family: str, save_dir: str, vocab_size: int, logit_std: float = 8.0, seed: int = 0):
    """Save a tiny random `family` model whose logits have std ~`logit_std` (real models' size, where the
    scaling and soft-capping matter) and, where the family's head has a bias, a non-zero one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size)).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        ids = torch.randint(3, vocab_size, (2, 12))
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        raw = hidden @ head.weight.t()
        head.weight.mul_(logit_std / raw.std().clamp(min=1e-6))
        if head.bias is not None:
            head.bias.normal_(0.0, logit_std / 2)
    model.save_pretrained(save_dir)
    return model
