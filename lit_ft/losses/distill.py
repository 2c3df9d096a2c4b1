"""Knowledge distillation over the vocabulary: the generalised Jensen-Shannon divergence of GKD (Agarwal et al.
2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"), per token, in chunks of
tokens so that no [tokens, vocab] fp32 tensor outlives its chunk (forward or backward)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float,
                    temperature: float = 1.0) -> Tensor:
    """Per-token divergence [...] between the distributions of `student_logits` and `teacher_logits` [..., V]
    (each divided by `temperature`, softmax in fp32), summed over the vocabulary.

    With S the student's distribution, T the teacher's and M = (1 - beta) S + beta T (GKD's and TRL's convention):

    - beta = 0: KL(T || S), the forward KL (supervised distillation's mode-covering loss);
    - beta = 1: KL(S || T), the reverse KL (mode-seeking);
    - otherwise: JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M). It is 0 at beta -> 0 and beta -> 1, which is
      why the two ends are the KLs named above rather than the limits (beta = 0.5: the usual JSD).

    Gradients flow to `student_logits` only; the teacher's logits are detached.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(S || T) per token [...] over the vocabulary, without a graph (a logged figure)."""
    with torch.no_grad():
        return generalized_jsd(student_logits.detach(), teacher_logits, 1.0, temperature)


def chunked_generalized_jsd(student_hidden: Tensor, teacher_hidden: Tensor,
                            student_logits: Callable[[Tensor], Tensor], teacher_logits: Callable[[Tensor], Tensor],
                            beta: float, temperature: float = 1.0, chunk_size: int = 1024, width: int | None = None,
                            targets: Tensor | None = None,
                            target_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """`generalized_jsd` and `reverse_kl` [N] of N tokens from their hidden states, `chunk_size` tokens at a time.

    `student_hidden` [N, H] (with grad), `teacher_hidden` [N, Ht] (no grad), and the functions that turn each into
    logits [n, V] (the models' own heads); `width`: the divergence compares the student's first `width` logits (a
    head padded past the vocabulary the two share) with the teacher's, which must have that many; None: all of them.
    Under grad each chunk runs under activation checkpointing: backward recomputes that chunk's logits, so at most
    one chunk's [chunk_size, V] fp32 tensors are alive at a time in either direction.

    `targets` [N] (token ids): also the student's log-probs of them under its whole head's logits divided by
    `target_temperature` (no grad: the log-prob a sampler at that temperature drew them with, from the logits the
    loss already made; no second pass of the head). Returns (divergence with grad, reverse KL detached, the
    targets' log-probs [N] fp32 detached or None).
    """
    logps: list[Tensor] = []
    forward = [True]  # the backward's recomputation of a chunk makes no log-probs again

    def one(h_s: Tensor, h_t: Tensor, *tok: Tensor) -> tuple[Tensor, Tensor]:
        s, t = student_logits(h_s), teacher_logits(h_t).detach()
        if tok and forward[0]:
            with torch.no_grad():
                x = s.detach().float() / target_temperature
                logps.append(x.gather(-1, tok[0][:, None].long()).squeeze(-1) - torch.logsumexp(x, -1))
        s = s if width is None else s[..., :width]
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"student logits have {s.shape[-1]} entries, the teacher's {t.shape[-1]}")
        return generalized_jsd(s, t, beta, temperature), reverse_kl(s, t, temperature)

    parts = []
    for i in range(0, student_hidden.shape[0], chunk_size):
        h_s, h_t = student_hidden[i : i + chunk_size], teacher_hidden[i : i + chunk_size].detach()
        tok = () if targets is None else (targets[i : i + chunk_size],)
        parts.append(checkpoint(one, h_s, h_t, *tok, use_reentrant=False) if h_s.requires_grad else one(h_s, h_t, *tok))
    forward[0] = False
    empty = student_hidden.new_zeros(0, dtype=torch.float32)
    lp = None if targets is None else torch.cat(logps) if logps else empty
    if not parts:
        return empty, empty, lp
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).detach(), lp
