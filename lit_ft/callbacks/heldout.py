"""Held-out evaluation with a task metric: `score_prompts` (generate and score rendered prompts), the
`SampleGenerations` callback (before and after training, at each validation) and `paired_change` (the change of a metric measured twice on the same examples)."""

from __future__ import annotations

import contextlib
import math
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.models import eval_mode
from lit_ft.online.engine_ops import RolloutWeights
from lit_ft.online.generation import SamplingSpec, generate
from lit_ft.online.scoring import resolve_callable
from lit_ft.train import strategies
from lit_ft.train.metrics import log_table


@torch.no_grad()
def score_prompts(model, tok, rows: list[tuple[str, str]], sampling: SamplingSpec, metric, batch_size: int,
                  device) -> list[tuple[str, str, str, float]]:
    """(prompt, generation, reference, metric(generation, reference)) for each rendered (prompt, reference) row,
    generated `batch_size` prompts at a time (left-padded, no special tokens added: the rendering has them)."""
    results = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False).to(device)
        out, _ = generate(model, enc["input_ids"], enc["attention_mask"], sampling, tok.eos_token_id, tok.pad_token_id)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        results += [(p, g.strip(), ref, float(metric(g.strip(), ref))) for (p, ref), g in zip(chunk, texts)]
    return results


def _free_memory(model) -> int | None:
    """Free bytes where the model's weights live: the CUDA device's, else the host's (free pages, the page cache not
    counted)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class SampleGenerations(L.Callback):
    """Generates answers for held-out prompts, scores them with a task metric, and shows them.

    Before training and after it the examples and the metric are printed; at each validation the metric is
    logged as `val/<metric_name>` and, with W&B, a table of prompts, generations and references. The final line
    compares after with before prompt by prompt (`paired_change`): how many prompts got better and worse, and the
    standard error of the mean change, which is what tells a gain from the noise of the evaluation set.
    The datamodule provides `held_out_prompts(n) -> [(prompt_text, reference)]` with the prompt already
    rendered in its template, and `tokenizer`.
    """

    def __init__(self, num_prompts: int = 64, batch_size: int = 32, max_new_tokens: int = 32, print_examples: int = 3,
                 metric: str = "lit_ft.data.tasks.answer_match", metric_name: str = "exact_match", merged: bool = False):
        """
        Args:
            num_prompts: held-out prompts evaluated each time.
            batch_size: prompts generated at once.
            max_new_tokens: longest generation (greedy).
            print_examples: generations printed before and after training.
            metric: dotted path of `fn(generation, reference) -> bool | float`.
            metric_name: the logged name, `val/<metric_name>`.
            merged: decode with the active LoRA adapter merged into a temporary copy of the wrapped weights (as
                `sampling.merged` does for rollouts: faster decode steps for one copy of those weights); where
                the base cannot be merged into (8-bit, DoRA) or the copy would not fit, unmerged, said once.
        """
        self.merged, self._told, self._told_off, self._told_empty = merged, False, False, False
        self.num_prompts, self.batch_size, self.print_examples = num_prompts, batch_size, print_examples
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=False)
        self.metric, self.metric_name = resolve_callable(metric), metric_name
        self.before: float | None = None

    def evaluate(self, trainer, pl_module) -> tuple[float, list[tuple[str, str, str, float]]] | None:
        """(score, results), or None when no held-out prompt has a reference answer (said once: prompts of
        preference pairs, say, have nothing to match)."""
        dm = trainer.datamodule
        tok = dm.tokenizer
        rows = dm.held_out_prompts(self.num_prompts)
        if not rows:
            if not self._told_empty:
                self._told_empty = True
                rank_zero_info(f"SampleGenerations: no held-out prompt has a reference answer: {self.metric_name} "
                               "is not measured")
            return None
        model = pl_module.model
        with eval_mode(model), torch.no_grad(), strategies.for_generation(trainer), self._merged(model):
            results = score_prompts(model, tok, rows, self.sampling, self.metric, self.batch_size, pl_module.device)
        score = sum(r[3] for r in results) / max(len(results), 1)
        return score, results

    def _merged(self, model):
        """The merged decode where it can run and fits: a base it cannot merge into (8-bit, DoRA) or a copy
        that would take more than half the free memory of the device decodes unmerged, said once (so a recipe that
        merges for a small model still evaluates a quantized or a large one)."""
        if not self.merged or not hasattr(model, "peft_config"):
            return contextlib.nullcontext()
        adapter = model.active_adapter
        need, free = RolloutWeights.bytes_needed(model, adapter), _free_memory(model)
        reason = RolloutWeights.refusal(model, adapter)
        if reason is None and free is not None and need > free / 2:
            reason = (f"its copy of the weights ({need / 2**30:.2f} GiB) is more than half the free memory "
                      f"({free / 2**30:.2f} GiB)")
        if reason is None:
            return RolloutWeights(model, adapter).swapped_in()
        if not self._told:
            rank_zero_info(f"SampleGenerations: merged decode skipped: {reason}")
            self._told = True
        return contextlib.nullcontext()

    def _print(self, when: str, score: float, results) -> None:
        rank_zero_info(f"\n[{when}] {self.metric_name} on {len(results)} held-out prompts: {score:.3f}")
        for p, g, ref, _ in results[: self.print_examples]:
            rank_zero_info(f"  prompt: {p[-80:]!r}\n  output: {g!r}\n  reference: {ref!r}")

    def _off(self, trainer) -> bool:
        """`--trainer.fast_dev_run N` is the smoke run (a few steps to see that everything wires up): the held-out
        generations, which take minutes, are left out, said once."""
        if trainer.fast_dev_run and not self._told_off:
            self._told_off = True
            rank_zero_info("SampleGenerations: held-out evaluation off under trainer.fast_dev_run")
        return bool(trainer.fast_dev_run)

    def on_train_start(self, trainer, pl_module):
        if self._off(trainer) or (evaluated := self.evaluate(trainer, pl_module)) is None:
            return
        self.before, results = evaluated
        self._before_results = results
        self._print("before training", self.before, results)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self._off(trainer) or (evaluated := self.evaluate(trainer, pl_module)) is None:
            return
        score, results = evaluated
        self._last = (trainer.global_step, score, results)
        pl_module.log(f"val/{self.metric_name}", score)
        self._log_table(trainer, results)

    def on_train_end(self, trainer, pl_module):
        if self._off(trainer):
            return
        step, score, results = getattr(self, "_last", (None, None, None))
        if step != trainer.global_step:  # no validation ran on the final weights: evaluate them now
            if (evaluated := self.evaluate(trainer, pl_module)) is None:
                return
            score, results = evaluated
        self._print("after training", score, results)
        if self.before is not None:
            line = f"{self.metric_name}: {self.before:.3f} -> {score:.3f}"
            before = getattr(self, "_before_results", None)
            if before is not None and [r[0] for r in before] == [r[0] for r in results]:  # the same prompts
                better, worse, mean, se = paired_change([r[3] for r in before], [r[3] for r in results])
                line += (f" (paired over {len(results)} prompts: {better} better, {worse} worse; change {mean:+.3f}, "
                         f"standard error {se:.3f})")
            rank_zero_info(line)
        self.after = score

    def _log_table(self, trainer, results) -> None:
        log_table(trainer, "val/samples", ["prompt", "generation", "reference", self.metric_name],
                  [list(r) for r in results])


def paired_change(before: list[float], after: list[float]) -> tuple[int, int, float, float]:
    """The change of a metric measured on the same examples twice: (examples that got better, that got worse, mean
    change, its standard error `std(after_i - before_i) / sqrt(n)`). Pairing removes the spread of difficulty
    between examples, so the error is much smaller than that of two independent proportions when few answers
    change."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return sum(x > 0 for x in d), sum(x < 0 for x in d), mean, math.sqrt(var / n) if n else 0.0
