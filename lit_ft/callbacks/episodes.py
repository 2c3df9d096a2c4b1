"""Held-out evaluation by multi-turn episodes against an environment: `HeldOutEpisodes` plays greedy episodes on
held-out prompt rows before and after training, and prints the share the environment rewarded (the calculator's
exact match), the share that called a tool, and the paired change of each (`lit_ft.callbacks.heldout.paired_change`),
in the lines `lit-ft demo` reads. Any stage whose module has a causal LM (`SFTModule`, `GRPOModule`, ...) can carry
it: the tool demo measures its SFT stage this way, as its GRPO stage, on the same prompts."""

from __future__ import annotations

import contextlib
import json

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks.heldout import paired_change
from lit_ft.data.recipes import resolve_source
from lit_ft.errors import ConfigError
from lit_ft.online import sampler as decode
from lit_ft.online.episodes import (Environment, EpisodeSpec, check_environment, check_tools, generation_mode,
                                    play)
from lit_ft.online.generation import SamplingSpec


class HeldOutEpisodes(L.Callback):
    """Greedy episodes on the first `num_prompts` rows of `prompts_file` against `environment` (None: the module's
    `environment`), before and after training. Printed: `[before training] <metric_name> on N held-out prompts: x`,
    `[before training] tool use on N held-out prompts: y` (the share of episodes with a parsed tool call), the same
    after, then `<metric_name>: x -> x'` and `tool use: y -> y'`, each with its paired change and standard error."""

    def __init__(self, environment: Environment | None = None, prompts_file: str = "demo:prompts_val.jsonl",
                 num_prompts: int = 64, batch_size: int = 32, max_new_tokens: int = 48,
                 episodes: EpisodeSpec = EpisodeSpec(max_turns=3, max_tokens=256, render_tools="hermes"),
                 metric_name: str = "exact_match", print_examples: int = 2, merged: bool = True):
        """
        Args:
            environment: the environment (`{class_path: ..., init_args: ...}`); None: the module's own.
            prompts_file: prompt rows (`prompt`, `answer`; `demo:NAME` is a shipped demo file), given to the
                environment's `reset` as read.
            num_prompts: the first rows played each time.
            batch_size: episodes played together.
            max_new_tokens: the longest model turn.
            episodes: the episodes' turns, tokens and tool rendering (as `model.episodes`).
            metric_name: the name printed for the episodes' mean reward (the calculator rewards exact match).
            print_examples: conversations printed before and after training.
            merged: decode with the active LoRA adapter merged into a copy of its weights (as
                `SampleGenerations(merged=True)`).
        """
        self.environment = None if environment is None else check_environment(environment, None)
        self.prompts_file, self.num_prompts, self.batch_size = prompts_file, num_prompts, batch_size
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=False, engine="hf", merged=merged)
        self.episodes = episodes if isinstance(episodes, EpisodeSpec) else EpisodeSpec(**(episodes or {}))
        self.metric_name, self.print_examples = metric_name, print_examples
        self.before: list[tuple[float, float]] | None = None

    def rows(self) -> list[dict]:
        path = resolve_source(self.prompts_file, "HeldOutEpisodes.prompts_file")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return rows[: self.num_prompts]

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> list[tuple[float, float, list[dict]]]:
        """(reward, called a tool, conversation) of each held-out episode."""
        env = self.environment or getattr(pl_module, "environment", None)
        if env is None:
            raise ConfigError("HeldOutEpisodes: no environment (give one, or use it with a module that has "
                              "model.environment)")
        dm = getattr(trainer, "datamodule", None)
        tok = getattr(pl_module, "tokenizer", None) or dm.tokenizer
        if getattr(env, "tools", None) and self.episodes.render_tools == "template":
            check_tools(tok, env.tools)  # a template that leaves the tools out, refused as the rollouts refuse it
        model = pl_module.model
        adapter = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
        sampler = decode.Sampler(model, tok.eos_token_id, tok.pad_token_id, adapter=adapter)
        rows, out = self.rows(), []
        for i in range(0, len(rows), self.batch_size):
            eps = play(sampler, tok, env, self.episodes, rows[i:i + self.batch_size], self.sampling,
                       pl_module.device, lambda: generation_mode(model, trainer))
            out += [(float(e.reward or 0.0), float(e.called), e.messages) for e in eps]
        sampler.weights = None  # the rollout copy of the weights, if any, freed now
        return out

    def _print(self, when: str, results) -> None:
        n = len(results)
        rank_zero_info(f"\n[{when}] {self.metric_name} on {n} held-out prompts: {sum(r[0] for r in results) / n:.3f}")
        rank_zero_info(f"[{when}] tool use on {n} held-out prompts: {sum(r[1] for r in results) / n:.3f}")
        for reward, _, messages in results[: self.print_examples]:
            turns = [m for m in messages if m["role"] != "system"]
            rank_zero_info(f"  reward {reward:g}: " + " | ".join(
                f"{m['role']}: {m['content'] or json.dumps([c['function'] for c in m.get('tool_calls', [])])}"[:120]
                for m in turns))

    def on_train_start(self, trainer, pl_module):
        if trainer.fast_dev_run:
            return
        results = self.evaluate(trainer, pl_module)
        self.before = [(r[0], r[1]) for r in results]
        self._print("before training", results)

    def on_train_end(self, trainer, pl_module):
        if trainer.fast_dev_run:
            return
        results = self.evaluate(trainer, pl_module)
        self._print("after training", results)
        if self.before is None:
            return
        for k, name in ((0, self.metric_name), (1, "tool use")):
            before, after = [b[k] for b in self.before], [r[k] for r in results]
            better, worse, mean, se = paired_change(before, after)
            rank_zero_info(f"{name}: {sum(before) / len(before):.3f} -> {sum(after) / len(after):.3f} (paired over "
                           f"{len(after)} prompts: {better} better, {worse} worse; change {mean:+.3f}, standard "
                           f"error {se:.3f})")
        self.after = [(r[0], r[1]) for r in results]
