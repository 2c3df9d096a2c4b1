"""Batched sampling with the KV cache from left-padded prompts (log-probs of the responses: `lit_ft.online.roles`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ft.errors import ConfigError
from lit_ft.losses import response_mask_after_eos
from lit_ft.validation import check_spec


@dataclass
class SamplingSpec:
    """How responses are sampled (the PPO rollout and the demo's sample tables)."""

    max_new_tokens: int = 64
    """Longest response."""
    min_new_tokens: int | None = None
    """With max_new_tokens, draw each batch's response length uniformly in [min, max] (TRL's LengthSampler)."""
    do_sample: bool = True
    """Sample; False is greedy decoding."""
    temperature: float = 1.0
    """Softmax temperature; the log-probs of PPO divide the logits by the same value."""
    top_k: int = 0
    """0 disables top-k filtering (PPO samples from the full distribution)."""
    top_p: float = 1.0
    """1.0 disables nucleus filtering."""
    engine: Literal["auto", "static", "hf"] = "auto"
    """Decoder: `static` = `lit_ft.online.engine.DecodeEngine` (static KV cache, fixed-shape step replayed as a CUDA graph
    on CUDA, eager elsewhere); `hf` = transformers' `generate`; `auto` = `static` on CUDA for models it serves,
    else `hf`."""
    merged: bool = False
    """Decode with the policy LoRA merged into a rollout copy of the LoRA-wrapped weights, so the decode runs no LoRA
    branches: one copy of them in memory (logged), refreshed every rollout (on 2 CPU cores, 16 demo prompts x 4
    samples with SmolLM2-135M and r16 on every projection: 6.5 s -> 5.9 s). A 4-bit base is de-quantized into the
    copy, in its compute dtype, so the decode reads plain weights instead of de-quantizing each one at every step;
    8-bit bases are refused. Both engines; the tokens are the unmerged policy's up to float rounding."""
    dequantize: bool = False
    """With a 4-bit base (QLoRA): decode from a copy of the policy's LoRA-wrapped base weights de-quantized once a
    rollout (in the compute dtype; one copy, logged and planned), the LoRA branches on as trained: the weights the
    4-bit layers de-quantize to, without their per-step de-quantization (equal numbers on the CPU; on CUDA
    bitsandbytes' own 4-bit GEMM rounds differently). `merged` does this too and also folds the LoRA in, which in bf16
    rounds W + delta once more (a larger sampler/trainer mismatch); the two exclude each other. Both engines."""
    cuda_graph: bool = True
    """Capture the static engine's decode step as a CUDA graph (CUDA only)."""
    compile: bool = False
    """The static engine's decode step through `torch.compile` (inductor) before its capture: the step's small
    element-wise kernels fused (norms, rotary, residuals, activations), at the cost of compiling it once a run (and
    once more, with symbolic sizes, at the first time a larger batch or prompt reallocates the cache). A model
    inductor cannot compile decodes eagerly, with a warning. Unused (and said in the log) where rollouts decode with
    transformers' `generate`: `engine: hf`, or where `auto`, the memory plan or multi-turn episodes choose it."""
    check_every: int = 8
    """The static engine reads 'every row finished?' on the host every this many tokens."""

    def __post_init__(self):
        check_spec(self, "model.sampling")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"model.sampling.min_new_tokens={self.min_new_tokens}: expected at most "
                              f"model.sampling.max_new_tokens={self.max_new_tokens}")
        if self.merged and self.dequantize:
            raise ConfigError("model.sampling.dequantize and model.sampling.merged are both true: merged folds the "
                              "LoRA into its (de-quantized) copy, dequantize keeps the LoRA branches on it (closer to the "
                              "4-bit layers' numbers); set one of them false")


class SampledLogprobs:
    """A logits processor for transformers' `generate` that records each sampled token's log-prob under
    log_softmax(logits / temperature): the distribution the training forward's log-probs use
    (`lit_ft.online.roles.token_logprobs`), not the top-k/top-p-filtered one the draw uses.

    Put first among the processors a caller passes, it sees the fp32 logits `generate` takes from the model after
    only the processors the model's own generation config asks for (none for most models; a repetition penalty
    there is part of what the sampler drew from), before the temperature and filtering warpers. A processor runs
    before the draw, so the token of step t is read from `input_ids` at step t + 1 and the last one by `finish`:
    one [B, V] fp32 tensor is kept between steps, never the [B, R, V] of `output_logits`."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # log-softmax of the last step's logits [B, V]
        self.steps: list[torch.Tensor] = []  # [B, 1] each

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]))
        logp = scores.float() / self.temperature  # a new tensor (the division), normalised in place
        self.previous = logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
        return scores

    def finish(self, responses: torch.Tensor) -> torch.Tensor:
        """[B, R] fp32 log-probs of the response tokens `generate` returned (R steps, or fewer where it undid
        steps it had run past the stop)."""
        n = responses.shape[1]
        if len(self.steps) < n:
            self.steps.append(self.previous.gather(1, responses[:, len(self.steps):n]))
        self.previous = None
        return torch.cat(self.steps, dim=1)[:, :n]


@torch.no_grad()
def generate(model, input_ids, attention_mask, spec: SamplingSpec, eos_token_id: int, pad_token_id: int,
             max_new_tokens: int | None = None, logprobs: bool = False):
    """Sample responses for left-padded prompts [B, P].

    Returns (responses [B, R], mask [B, R]); tokens after the first EOS are replaced by pad and masked out. With
    `logprobs`, also the sampled tokens' log-probs [B, R] under log_softmax(logits / temperature), 0 where masked
    (`SampledLogprobs`; what `lit_ft.online.engine.DecodeEngine` returns too).
    """
    if attention_mask[:, -1].min() == 0:
        raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
    kwargs = dict(
        max_new_tokens=max_new_tokens or spec.max_new_tokens,
        do_sample=spec.do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    if spec.do_sample:
        kwargs.update(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
    cache = shared_prefix_cache(model, input_ids, attention_mask)
    if cache is not None:
        kwargs[cache_argument(model)] = cache
    recorder = SampledLogprobs(spec.temperature) if logprobs else None
    if recorder is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([recorder])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    responses = out[:, input_ids.shape[1]:]
    mask = response_mask_after_eos(responses, eos_token_id, pad_token_id).long()
    if recorder is None:
        return responses.masked_fill(mask == 0, pad_token_id), mask
    # where(), not a product: a pad position's log-prob may be -inf (a processor of the model's config)
    logp = torch.where(mask.bool(), recorder.finish(responses), 0.0)
    return responses.masked_fill(mask == 0, pad_token_id), mask, logp


def shared_prefix_cache(model, input_ids, attention_mask):
    """The KV cache of every prompt but its last token, computed once per distinct prompt and repeated for its
    copies, or None (no prompt repeats, or a model `generate` does not serve with a plain DynamicCache).

    GRPO and PPO with several samples a prompt put each prompt's copies side by side; their prefill is the same
    work done k times (with a 40-token chat prompt and 16 new tokens, most of a CPU rollout's compute). `generate`
    then starts from this cache: it runs only the last prompt token before sampling, at the positions it derives
    from the attention mask, as it would have."""
    from transformers import DynamicCache

    if input_ids.shape[1] < 2 or not _default_dynamic_cache(model):
        return None
    distinct, inverse = torch.unique_consecutive(input_ids, dim=0, return_inverse=True)
    if len(distinct) == len(input_ids):
        return None
    first = torch.zeros(len(distinct), dtype=torch.long, device=input_ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), "amin", include_self=False)
    ids, mask = input_ids[first, :-1], attention_mask[first, :-1]
    base = _base(model)
    cache = DynamicCache(config=base.config.get_text_config(decoder=True))
    kw = {cache_argument(model): cache}
    if "position_ids" in _forward_params(model):  # as `generate` derives them from the mask (left padding)
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
    cache.batch_select_indices(inverse)
    return cache


def _base(model):
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _forward_params(model):
    import inspect

    return inspect.signature(type(_base(model)).forward).parameters


def cache_argument(model) -> str:
    """transformers 5.17 names the cache argument `past_key_values`, later 5.x releases `cache`."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _default_dynamic_cache(model) -> bool:
    """Whether `generate` would make a plain DynamicCache for this model (no model-specific or static cache) and
    its forward can keep only the last position's logits."""
    base = _base(model)
    params = _forward_params(model)
    implementation = getattr(getattr(base, "generation_config", None), "cache_implementation", None)
    return (getattr(base, "_supports_default_dynamic_cache", lambda: False)() and implementation in (None, "dynamic")
            and "logits_to_keep" in params and ("cache" in params or "past_key_values" in params)
            and not getattr(base.config, "is_encoder_decoder", False))
