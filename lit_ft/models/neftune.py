"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise on the input
embeddings while training, `alpha / sqrt(L * d)` times `Uniform(-1, 1)` for a batch of `L` positions of width `d`.

Only in training mode: validation, generation and exports see the model unchanged. The paper's alphas are 5, 10 and
15 (5 in most of its tables); L is the padded length of the batch, as in the paper's code and transformers'.
"""

from __future__ import annotations

import math

import torch


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """`embeddings` [B, L, d] plus NEFTune noise of scale `alpha / sqrt(L * d)`."""
    scale = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])
    return embeddings + torch.empty_like(embeddings).uniform_(-scale, scale)


def add_neftune(model, alpha: float):
    """Put NEFTune on `model`'s input embeddings (a forward hook); returns the hook's handle."""
    embed = model.get_input_embeddings()

    def hook(module, inputs, output):
        return neftune_noise(output, alpha) if module.training else output

    return embed.register_forward_hook(hook)
