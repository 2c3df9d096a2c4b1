"""On-policy distillation's hyper-parameters (`DistillSpec`, the `model.distill` section of configs/distill.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from lit_ft.validation import check_spec


@dataclass
class DistillSpec:
    """GKD (Agarwal et al. 2024): the divergence, the share of on-policy steps, and the update's shape."""

    beta: float = 0.5
    """The generalised JSD's interpolation (`lit_ft.losses.generalized_jsd`; GKD's and TRL's convention, TRL's
    default 0.5): 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), in between JSD_beta with
    the mixture (1 - beta) student + beta teacher."""
    lmbda: float = 1.0
    """The share of training steps on the student's own samples (GKD's lambda; TRL's `lmbda`, default 0.5); the
    others train on the data's own responses (rows with a `completions` list in the batch). 1 (fully on-policy, the
    paper's best setting) by default, since `PromptDataModule` carries prompts only: below 1 the batches must carry
    responses (a ConfigError otherwise)."""
    temperature: float = 1.0
    """Both distributions are softmax(logits / temperature) in the loss (TRL's `temperature`, 0.9, which TRL also
    samples with; here sampling uses `model.sampling.temperature`: set both alike to match)."""
    logits_chunk_size: int = 1024
    """Response tokens whose [tokens, vocab] fp32 logits of both models exist at once (forward and backward: each
    chunk is recomputed in backward)."""
    mini_batch_size: int = 8
    """Rows per forward/backward (also the chunk size of the teacher's no-grad pass)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (the loss is the token mean over the step's responses on all ranks)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of each optimizer step."""
    disable_dropout: bool = True
    """Zero every dropout (the sampled student and the trained one are one function)."""

    def __post_init__(self):
        check_spec(self, "model.distill")
