"""What the online stages check in `setup`, before any model is built: a strategy they can run under, and a reward
that can be earned at all (a verifiable reward needs answers it can match)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.errors import ConfigError


# Strategies the online stages refuse, and why (checked in `setup`, before any model is built or moved).
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "rollouts generate inside the training step, where FSDP cannot gather full parameters",
    "DeepSpeedStrategy": "measured on an H200 with ZeRO-2 for PPO: its manual-optimization update (backward passes "
                         "over minibatches, then one optimizer step) ran without an error but left the trainable "
                         "weights unchanged; GRPO's update is the same loop",
}


def check_strategy(trainer, stage: str) -> None:
    name = type(trainer.strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise ConfigError(
            f"trainer.strategy: {stage} under {name.removesuffix('Strategy')} is not supported "
            f"({UNSUPPORTED_STRATEGIES[name]}); use configs/strategies/ddp.yaml, where each rank rolls out its "
            "own prompts, with a 4-bit base (model.base.quantization nf4) for large models"
        )


def setup(module, stage: str, name: str) -> None:
    """What the online stages check in `setup`, before any model is built: the strategy, and that the reward can be
    earned at all."""
    check_strategy(module.trainer, name)
    if stage == "fit":
        check_answers(module)


def check_answers(module) -> None:
    """A verifiable reward (one with `usable_answer`, like `correctness_reward`) on prompts without answers it can
    match scores every response 0: every GRPO group is dropped and the run trains nothing while exiting 0. So no
    usable answer in the training rows is a ConfigError before the first step; some rows without one, a warning with
    their count."""
    usable = getattr(module.reward_fn, "usable_answer", None)
    datamodule = getattr(module.trainer, "datamodule", None)
    rows = getattr(datamodule, "train_dataset", None)
    if usable is None or rows is None or len(rows) == 0:
        return
    answers = rows["answer"] if "answer" in rows.column_names else [None] * len(rows)
    good = sum(1 for a in answers if a is not None and usable(a))
    where = f"{getattr(datamodule, 'train_file', None) or 'the training data'}"
    field = getattr(datamodule, "answer_field", "answer")
    if good == 0:
        raise ConfigError(
            f"model.reward_fn={module.reward_fn_name}: needs an answer for every prompt, but none of the {len(rows)} "
            f"training rows of {where} has one it can match in data.answer_field={field!r} (missing, empty, or not "
            "of its kind): every reward would be 0 and nothing would train. Name the column that holds the answers "
            "(data.answer_field) or use a reward that needs none")
    if good < len(rows):
        rank_zero_warn(f"model.reward_fn={module.reward_fn_name}: {len(rows) - good} of {len(rows)} training rows of "
                       f"{where} have no answer it can match (data.answer_field={field!r}); their reward is always 0")
