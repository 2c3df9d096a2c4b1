"""The rollout batch the online stages fill step by step (`Rollout`: prompts, sampled responses, log-probs, values,
advantages), each prompt repeated for its samples, and the minibatch slices of an update."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import Tensor


def repeat_prompts(batch: dict, k: int) -> dict:
    """Each prompt row `k` times in a row (tensors along dim 0, lists element by element): k episodes a prompt."""
    if k == 1:
        return batch
    return {key: v.repeat_interleave(k, dim=0) if isinstance(v, Tensor) else [x for x in v for _ in range(k)]
            for key, v in batch.items()}


@dataclass
class Rollout:
    """One batch of prompts with sampled responses and everything PPO computes from them (rows = episodes)."""

    input_ids: Tensor
    attention_mask: Tensor
    responses: Tensor
    mask: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    entropy: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    sampler_logprobs: Tensor | None = None
    """[B, R] the sampler's log-probs of the response tokens (either engine), 0 after EOS: what the rollout
    correction and the `rollout/*` mismatch figures compare `old_logprobs` with."""
    attend: Tensor | None = None
    """[B, R] episodes against an environment (`lit_ft.online.episodes`): 1 on every response token, the model's
    and the environment's (what the forward attends to), where `mask` is 1 on the model's own tokens only (what
    log-probs, the KL and the loss count). None: `mask` is both."""
    env_rewards: Tensor | None = None
    """[B] episodes: the environment's reward of each episode (0 where it gave none), added to the score."""
    teacher_hidden: Tensor | None = None
    """[B, R, Ht] distillation: the teacher's final hidden states that predict each response token (no grad); its
    head turns a chunk of them into logits when the loss needs them."""

    @property
    def visible(self) -> Tensor:
        """[B, R] the response tokens the forward attends to (`attend`, else `mask`)."""
        return self.mask if self.attend is None else self.attend

    def rows(self, idx) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self) if getattr(self, f.name) is not None})


def slices(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]
