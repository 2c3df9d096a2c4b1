"""`WritePredictions`: writes the generations of `predict` (`lit_ft.stages.predict`) and scores them.

    lit-ft predict --config sft --ckpt_path last --data.predict_file prompts.jsonl
    lit-ft predict --config sft --model.base.adapter runs/ppo/latest/adapter --data.predict_file prompts.jsonl

Either a checkpoint of the run (`--ckpt_path`) or an exported adapter (`model.base.adapter`, any causal-LM stage's
export: SFT, PPO) gives the weights. `WritePredictions` writes one JSON line per prompt (`line`, `prompt`,
`generation`, and `answer` with `correct` when the file has answers) and prints the task metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.online.generation import SamplingSpec
from lit_ft.online.scoring import resolve_callable


class WritePredictions(L.Callback):
    """Writes `predict`'s generations as JSON Lines and, where the prompts have answers, prints the task metric."""

    def __init__(self, path: str = "predictions.jsonl", max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, metric: str | None = "lit_ft.data.tasks.answer_match"):
        """
        Args:
            path: the output file (under `lit-ft`, a relative path is inside the predict run's directory).
            max_new_tokens: longest generation.
            do_sample: sample; False is greedy decoding.
            temperature: softmax temperature when sampling.
            top_p: nucleus sampling threshold when sampling (1.0 = off).
            metric: dotted path of `fn(generation, answer) -> bool | float` scored on rows with an answer;
                None = no score.
        """
        self.path = Path(path)
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_p=top_p)
        self.metric = metric
        self._file = None
        self._scores: list[float] = []

    def _target(self, trainer) -> Path:
        if trainer.world_size == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")

    def on_predict_start(self, trainer, pl_module) -> None:
        pl_module.predict_sampling = self.sampling
        target = self._target(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file, self._scores = open(target, "w"), []
        self._score = None
        if self.metric:
            self._score = resolve_callable(self.metric)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for row in outputs or []:
            if self._score is not None and "answer" in row:
                row["correct"] = float(self._score(row["generation"], row["answer"]))
                self._scores.append(row["correct"])
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._file.close()
        rank_zero_info(f"[predict] generations written to {self._target(trainer)}")
        if self._scores:
            name = self.metric.rpartition(".")[2]
            rank_zero_info(f"[predict] {name} {sum(self._scores) / len(self._scores):.3f} on {len(self._scores)} "
                           "prompts with an answer")
