"""What a stage calls to sample responses: `Sampler` picks the decoder for a `SamplingSpec` (the static
`engine.DecodeEngine` or HF `generate`, `generation.generate`), keeps the engine (its cache and graphs) and the
rollout copy of the weights between calls, and turns a base the rollout copy cannot serve into the setting's error."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_ft.online.engine import DecodeEngine
from lit_ft.online.engine_ops import RolloutWeights, engine_unsupported

__all__ = ["DecodeEngine", "Sampler", "autocast_mismatch", "precision_mismatch"]


def autocast_mismatch(model, device) -> str | None:
    """Why autocast rules the engine out, or None. Autocast over weights of another dtype (fp32 weights under
    bf16-mixed) gives keys and values of mixed dtypes (RoPE promotes the keys back to fp32), which a static cache
    written in place cannot hold (HF's dynamic cache concatenates and promotes); seen on the H200."""
    dev = torch.device(device).type
    return _mixed(model, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None


def precision_mismatch(model, precision) -> str | None:
    """`autocast_mismatch` from the trainer's precision setting, before any autocast is on (when a stage builds its
    roles): `bf16-mixed` / `16-mixed` over weights of another dtype."""
    text = str(precision)
    low = {"bf16": torch.bfloat16, "16": torch.float16}.get(text.split("-")[0])
    return _mixed(model, low) if low is not None and text.endswith("mixed") else None


def _mixed(model, low: torch.dtype) -> str | None:
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights is None or weights == low:
        return None
    return (f"{low} autocast over {weights} weights: trainer.precision *-mixed over model.base.dtype {weights}; "
            f"*-true precision or weights in {low} serve it")


class Sampler:
    """What a stage calls to sample responses: picks the decoder per `SamplingSpec.engine` and keeps the static
    engine (its cache and graphs) between calls. `sampler(input_ids, attention_mask, spec, max_new_tokens)` ->
    (responses [B, R], mask [B, R]), as `lit_ft.online.generation.generate` returns; with `logprobs=True` also the
    sampled tokens' log-probs [B, R] under log_softmax(logits / temperature), 0 where masked (either engine)."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int, adapter: str | None = "policy"):
        self.model, self.eos, self.pad, self.adapter = model, eos_token_id, pad_token_id, adapter
        self.engine: DecodeEngine | None = None
        self.weights: RolloutWeights | None = None  # the hf engine's rollout copy (the static engine keeps its own)
        self.choice: str | None = None
        self.engine_settings: tuple | None = None  # the spec's decode settings the engine was built for

    def resolve(self, spec, device, length: int | None = None) -> str:
        """`static` or `hf` for this spec on this device (auto: static on CUDA where the engine can serve), for
        rollouts of `length` prompt + new tokens where known."""
        from lit_ft.errors import ConfigError

        if spec.engine not in ("auto", "static", "hf"):
            raise ConfigError(f"model.sampling.engine: expected auto, static or hf, got {spec.engine!r}")
        reason = engine_unsupported(self.model, length) or autocast_mismatch(self.model, device)
        if spec.engine == "static" and reason is not None:
            raise ConfigError(f"model.sampling.engine: static cannot serve this model ({reason}); use hf or auto")
        if spec.engine == "auto":
            return "static" if device.type == "cuda" and reason is None else "hf"
        return spec.engine

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, spec, max_new_tokens: int | None = None,
                 logprobs: bool = False):
        from lit_ft.online.generation import generate

        n = max_new_tokens or spec.max_new_tokens
        # what the static cache would hold (the engine allocates for spec.max_new_tokens)
        shape = (input_ids.shape[0], input_ids.shape[1], max(n, spec.max_new_tokens))
        length = sum((self.engine.grown(*shape) if self.engine is not None else shape)[1:])
        choice = self.resolve(spec, input_ids.device, length)
        settings = (spec.merged, spec.dequantize, spec.cuda_graph, spec.compile)
        if choice == "static" and self.engine is not None and self.engine_settings != settings:
            # a spec that decodes differently (another rollout copy, graphs or compile): a new engine, the old one's
            # cache, graphs and copy freed first, and the choice logged again
            self.engine, self.choice = None, None
        if choice != self.choice:
            notes = [note for note, on in (("merged policy", spec.merged),
                                           ("de-quantized base", spec.dequantize and not spec.merged),
                                           ("compiled step", spec.compile and choice == "static"),
                                           ("sampling.compile unused: hf has no step to compile",
                                            spec.compile and choice == "hf")) if on]
            rank_zero_info(f"rollouts decode with the {choice} engine" + (f" ({'; '.join(notes)})" if notes else ""))
            self.choice = choice
        if choice == "hf":
            args = (self.model, input_ids, attention_mask, spec, self.eos, self.pad, n, logprobs)
            if not ((spec.merged or spec.dequantize) and self.adapter and hasattr(self.model, "peft_config")):
                return generate(*args)
            if self.weights is None or self.weights.merge != spec.merged:
                self.weights = _copy_or_config_error(spec, lambda: RolloutWeights(self.model, self.adapter,
                                                                                   merge=spec.merged))
            with self.weights.swapped_in():
                return generate(*args)
        if self.engine is None:
            self.engine_settings = settings
            self.engine = _copy_or_config_error(spec, lambda: DecodeEngine(
                self.model, self.eos, self.pad, self.adapter, spec.merged, spec.cuda_graph, spec.check_every,
                spec.compile, spec.dequantize))
        self.engine.check_every = spec.check_every  # read by the host loop only: no rebuild
        # the allocation covers max_new_tokens, so a shorter drawn length (min_new_tokens) reuses the graphs
        if self.engine.shape is None:
            self.engine._allocate(*input_ids.shape, spec.max_new_tokens, input_ids.device)
        out = self.engine.generate(input_ids, attention_mask, n, spec.do_sample, spec.temperature, spec.top_k,
                                   spec.top_p)
        return out if logprobs else out[:2]


def _copy_or_config_error(spec, build):
    """`build()`, its refusal of a base it cannot copy for the rollout (8-bit, DoRA; de-quantizing a base that is not
    4-bit) raised as the setting's error (no copy asked for: any error as it is)."""
    if not (spec.merged or spec.dequantize):
        return build()
    try:
        return build()
    except ValueError as e:
        from lit_ft.errors import ConfigError

        raise ConfigError(f"model.sampling.{'merged' if spec.merged else 'dequantize'}: {e}") from e
