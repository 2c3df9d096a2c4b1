"""Judged evaluation (`lit-ft judge`): policies answer held-out prompts, a reward model none of them was trained
against scores every answer, and each policy is compared with a baseline prompt by prompt.

Per policy and judge: the judge's mean score; against the baseline, the win rate (a tie counts half) and the mean score
difference, each with its paired standard error (sd of the per-prompt values / sqrt(n): the prompts are shared, so
the prompt-to-prompt spread cancels); and the KL to the baseline policy measured on the policy's own samples,
sum_t log pi(y_t) - log pi_base(y_t) per answer (the k1 estimator; under the sampling temperature T both policies'
logits are divided by T, so it is the KL between the distributions actually sampled). Judge score against KL over
training is the over-optimisation curve of Gao et al. 2022. The number of distinct answers shows a policy that
collapsed onto a few stock answers (a refusal, say) however the judges score them. Several judges score the same
answers (one sampling pass per policy).

All policies are adapters on one base (or the base alone) and share its weights in memory; the judge is an exported
reward adapter (`RewardModule`'s format) loaded beside them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_ft.errors import ConfigError
from lit_ft.online import roles
from lit_ft.online.generation import SamplingSpec, generate

BASE = "base"  # a policy named so, with no adapter: the base model alone


@dataclass
class Judged:
    """One policy's answers and what the judges and the baseline make of them."""

    name: str
    responses: list[str]
    scores: dict[str, Tensor]  # judge name -> [N] its score of each answer
    kl: Tensor  # [N] log pi(y|x) - log pi_base(y|x) of each answer (0 for the baseline itself)
    lengths: Tensor  # [N] response tokens
    vs_baseline: dict[str, dict] = field(default_factory=dict)  # judge name -> `paired` against the baseline

    @property
    def distinct(self) -> int:
        """How many different answers (a policy collapsed onto a few stock answers has few)."""
        return len(set(self.responses))


def paired(a: Tensor, b: Tensor) -> dict:
    """Prompt-by-prompt comparison of two policies' judge scores on the same prompts: win rate of `a` (ties half)
    and mean score difference a - b, each with its paired standard error sd / sqrt(n)."""
    a, b = a.double(), b.double()
    n = a.numel()
    wins = (a > b).double() + 0.5 * (a == b).double()
    diff = a - b

    def se(x: Tensor) -> float:
        return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    return {"n": n, "win_rate": float(wins.mean()), "win_se": se(wins), "score_diff": float(diff.mean()),
            "diff_se": se(diff)}


@contextlib.contextmanager
def as_policy(model, name: str):
    """Run the block with policy `name`'s adapter active (`BASE`: every adapter off)."""
    if name == BASE:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(name)
    yield model


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], name: str, spec: SamplingSpec, batch_size: int, seed: int):
    """Sample one answer per prompt from policy `name`: (prompt ids, prompt mask, responses, response mask) lists of
    per-batch tensors. Batch k is seeded with seed + k, so a policy's answers do not depend on the others'."""
    device = next(model.parameters()).device
    out = []
    for k, i in enumerate(range(0, len(prompts), batch_size)):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        torch.manual_seed(seed + k)
        with as_policy(model, name):
            responses, mask = generate(model, enc["input_ids"], enc["attention_mask"], spec, tokenizer.eos_token_id,
                                       tokenizer.pad_token_id)
        out.append((enc["input_ids"], enc["attention_mask"], responses, mask))
    return out


@torch.no_grad()
def logprob_sums(model, name: str, batch, temperature: float) -> Tensor:
    """[B] sum of log pi_name(y_t | x, y_<t) over each response's real tokens, logits divided by `temperature`."""
    prompt_ids, prompt_mask, responses, response_mask = batch
    ids, mask, positions = roles.sequence(prompt_ids, prompt_mask, responses, response_mask)
    with as_policy(model, name):
        hidden = roles.trunk(model, ids, mask, positions)
        logprobs, _ = roles.token_logprobs(model, roles.response_hidden(hidden, prompt_ids.shape[1]), responses,
                                           temperature)
    return (logprobs.float() * response_mask).sum(1)


def judge_policies(model, tokenizer, names: list[str], baseline: str, prompts: list[str], judge_texts,
                   scorers: dict, spec: SamplingSpec, batch_size: int = 16, seed: int = 0) -> list[Judged]:
    """Every policy in `names` (adapter names on `model`, or `BASE`) answers `prompts` (rendered for the policies);
    `judge_texts(i, response)` renders prompt i with a response in the judges' template, each of `scorers` (judge
    name -> `RewardScorer`) scores it; each policy is compared with `baseline` by every judge."""
    if baseline not in names:
        raise ConfigError(f"--baseline {baseline}: not one of the policies {names}")
    temperature = spec.temperature if spec.do_sample else 1.0
    results = {}
    for name in names:
        batches = answer(model, tokenizer, prompts, name, spec, batch_size, seed)
        texts, kl, lengths = [], [], []
        for batch in batches:
            _, _, responses, mask = batch
            texts += [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
            lengths.append(mask.sum(1).cpu())
            own = logprob_sums(model, name, batch, temperature)
            base = own if name == baseline else logprob_sums(model, baseline, batch, temperature)
            kl.append((own - base).cpu())
        judged = [judge_texts(i, t) for i, t in enumerate(texts)]
        scores = {j: scorer.score(judged, batch_size=batch_size) for j, scorer in scorers.items()}
        results[name] = Judged(name, texts, scores, torch.cat(kl), torch.cat(lengths))
    for r in results.values():
        r.vs_baseline = {j: paired(r.scores[j], results[baseline].scores[j]) for j in scorers}
    return [results[n] for n in names]


def report(results: list[Judged], baseline: str) -> str:
    """The table `lit-ft judge` prints: one block per judge."""
    n = len(results[0].responses)
    blocks = []
    for j in results[0].scores:
        rows = [f"judge {j}", f"{'policy':<14} {'judge score':>18} {'win rate vs ' + baseline:>22} {'score diff':>18} "
                f"{'KL to ' + baseline + ' (nats)':>22} {'tokens':>7} {'distinct':>8}"]
        for r in results:
            s, v, kl = r.scores[j].double(), r.vs_baseline[j], r.kl.double()
            kl_se = float(kl.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            rows.append(f"{r.name:<14} {float(s.mean()):>9.3f} ± {float(s.std() / math.sqrt(n)):<6.3f} "
                        f"{v['win_rate']:>13.3f} ± {v['win_se']:<6.3f} "
                        f"{v['score_diff']:>9.3f} ± {v['diff_se']:<6.3f} "
                        f"{float(kl.mean()):>13.3f} ± {kl_se:<6.3f} {float(r.lengths.float().mean()):>7.1f} "
                        f"{r.distinct:>8}")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)
