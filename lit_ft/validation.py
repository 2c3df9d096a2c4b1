"""Allowed values of every numeric and enum-like setting, checked when a spec or module is constructed.

One table (`RULES`) is the single source: the specs' ``__post_init__``, the DataModules' and LightningModules'
``__init__`` call `check_settings`, and `settings_table` renders the same table for docs/data.md (a test keeps the
two equal). Enum-like settings (``Literal[...]`` annotations) are checked against their annotation, so a value
passed from Python (where nothing else checks a ``Literal``) fails as early as one from YAML.
A bad value is a `ConfigError` naming the key, the value and the allowed range, before any compute is spent.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass

from lit_ft.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """An allowed range: ``lo``/``hi`` bounds (open or closed), integers only, None allowed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    nullable: bool = False

    def ok(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            return False
        if not math.isfinite(value):  # NaN fails every comparison below anyway; inf is never a useful setting
            return False
        lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return lo_ok and hi_ok

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            rng = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            rng = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            rng = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            return f"any finite {kind[2:]}" + (" or null" if self.nullable else "")
        return f"{kind} {rng}" + (" or null" if self.nullable else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POS_INT = Rule(lo=1, integer=True)
POS_INT_OR_NONE = Rule(lo=1, integer=True, nullable=True)
NONNEG_INT = Rule(lo=0, integer=True)
NONNEG_INT_OR_NONE = Rule(lo=0, integer=True, nullable=True)
POSITIVE = Rule(lo=0, lo_open=True)
POSITIVE_OR_NONE = Rule(lo=0, lo_open=True, nullable=True)
NONNEG = Rule(lo=0)
NONNEG_OR_NONE = Rule(lo=0, nullable=True)
UNIT = Rule(lo=0, hi=1)
UNIT_OPEN = Rule(lo=0, hi=1, hi_open=True)
FINITE = Rule()
FINITE_OR_NONE = Rule(nullable=True)

_DATA = {"val_split": UNIT_OPEN, "max_length": POS_INT, "batch_size": POS_INT, "eval_batch_size": POS_INT_OR_NONE,
         "pad_to_multiple_of": POS_INT_OR_NONE, "num_workers": NONNEG_INT, "num_proc": POS_INT_OR_NONE,
         "seed": NONNEG_INT}

# section -> setting -> rule. Sections are the keys a config file uses (model.* of the LightningModules).
RULES: dict[str, dict[str, Rule]] = {
    "model.base": {"checkpoint_every": POS_INT},
    "model.lora": {"r": POS_INT, "alpha": POSITIVE, "dropout": UNIT_OPEN, "init_svd_iters": NONNEG_INT},
    "model.optim": {"lr": POSITIVE, "weight_decay": NONNEG, "eps": POSITIVE, "warmup_ratio": UNIT,
                    "warmup_steps": NONNEG_INT_OR_NONE, "min_lr_ratio": UNIT,
                    "loraplus_lr_ratio": Rule(lo=1, nullable=True)},
    "model.ppo": {"samples_per_prompt": POS_INT, "ppo_epochs": POS_INT, "mini_batch_size": POS_INT,
                  "gradient_accumulation_steps": POS_INT, "cliprange": POSITIVE, "cliprange_value": POSITIVE,
                  "vf_coef": NONNEG, "gamma": UNIT, "lam": UNIT, "init_kl_coef": NONNEG, "target": POSITIVE,
                  "horizon": POSITIVE, "target_kl": POSITIVE_OR_NONE,
                  "ratio_threshold": POSITIVE_OR_NONE, "score_clip": POSITIVE_OR_NONE,
                  "missing_eos_penalty": NONNEG_OR_NONE, "max_grad_norm": POSITIVE_OR_NONE,
                  "rollout_correction_cap": Rule(lo=1, lo_open=True)},
    "model.grpo": {"samples_per_prompt": POS_INT, "num_iterations": POS_INT, "mini_batch_size": POS_INT,
                   "gradient_accumulation_steps": POS_INT, "cliprange_low": UNIT_OPEN, "cliprange_high": NONNEG,
                   "beta": NONNEG, "missing_eos_penalty": NONNEG_OR_NONE, "overlong_buffer": POS_INT_OR_NONE,
                   "overlong_penalty": NONNEG, "max_grad_norm": POSITIVE_OR_NONE,
                   "cispo_ratio_max": POSITIVE, "cispo_ratio_min": NONNEG_OR_NONE,
                   "rollout_correction_cap": Rule(lo=1, lo_open=True)},
    "model.sampling": {"max_new_tokens": POS_INT, "min_new_tokens": POS_INT_OR_NONE, "temperature": POSITIVE,
                       "top_k": NONNEG_INT, "top_p": Rule(lo=0, hi=1, lo_open=True), "check_every": POS_INT},
    "model (SFTModule)": {"loss_chunk_size": POS_INT, "max_consecutive_skips": POS_INT,
                          "neftune_alpha": POSITIVE_OR_NONE},
    "model (RewardModule)": {"center_coef": NONNEG, "max_consecutive_skips": POS_INT},
    "model (PPOModule)": {"reward_fn_weight": FINITE, "sample_table_every": NONNEG_INT},
    "model (GRPOModule)": {"reward_fn_weight": FINITE, "sample_table_every": NONNEG_INT},
    "model.episodes": {"max_turns": POS_INT, "max_tokens": POS_INT},
    "model.kto": {"beta": POSITIVE, "desirable_weight": POSITIVE, "undesirable_weight": POSITIVE,
                  "logp_chunk_size": POS_INT, "ref_batch_size": POS_INT},
    "model (KTOModule)": {"max_consecutive_skips": POS_INT},
    "model.distill": {"beta": UNIT, "lmbda": UNIT, "temperature": POSITIVE, "logits_chunk_size": POS_INT,
                      "mini_batch_size": POS_INT, "gradient_accumulation_steps": POS_INT,
                      "max_grad_norm": POSITIVE_OR_NONE},
    "model (DistillModule)": {"sample_table_every": NONNEG_INT},
    "data (InstructionDataModule)": _DATA | {"min_score": FINITE_OR_NONE},
    "data (PreferenceDataModule)": _DATA,
    "data (PromptDataModule)": _DATA,
    # KTO's KL estimate pairs each prompt with another example's completion of the same micro-batch
    "data (UnpairedPreferenceDataModule)": _DATA | {"batch_size": Rule(lo=2, integer=True),
                                                    "eval_batch_size": Rule(lo=2, integer=True, nullable=True)},
}


def _prefix(section: str) -> str:
    return section.split(" (")[0]


def check_value(key: str, value, rule: Rule) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` obeys ``rule``."""
    if not rule.ok(value):
        raise ConfigError(f"{key}={value!r}: expected {rule.text()}")


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {list(choices)}")


def _literals(hints: dict) -> dict[str, tuple]:
    """Settings annotated ``Literal[...]`` (or ``Literal[...] | None``) and their allowed values."""
    out = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal:
            out[name] = args
        elif args and any(typing.get_origin(a) is typing.Literal for a in args):
            out[name] = tuple(v for a in args for v in (typing.get_args(a) or (None,)))
    return out


def check_settings(section: str, values: dict, annotated) -> None:
    """Check ``values`` (setting -> value) against the rules of ``section`` and the Literal annotations of
    ``annotated`` (a dataclass or a function whose parameters are the settings)."""
    prefix = _prefix(section)
    for name, rule in RULES.get(section, {}).items():
        if name in values:
            check_value(f"{prefix}.{name}", values[name], rule)
    target = annotated.__init__ if inspect.isclass(annotated) and not hasattr(annotated, "__dataclass_fields__") \
        else annotated
    for name, choices in _literals(typing.get_type_hints(target)).items():
        if name in values:
            check_choice(f"{prefix}.{name}", values[name], choices)


def check_spec(spec, section: str) -> None:
    """``__post_init__`` of a settings dataclass."""
    check_settings(section, {n: getattr(spec, n) for n in spec.__dataclass_fields__}, type(spec))


def check_init(section: str, cls, local: dict) -> None:
    """The first line of a module's ``__init__``: ``check_init("data (X)", X, locals())``."""
    names = inspect.signature(cls.__init__).parameters
    check_settings(section, {n: local[n] for n in names if n in local and n != "self"}, cls)


# Where each section's settings are declared: their Literal (enum-like) settings join the table of docs/data.md.
SOURCES = {
    "model.base": "lit_ft.models:ModelSpec", "model.lora": "lit_ft.models:LoraSpec",
    "model.optim": "lit_ft.train.optim:OptimSpec", "model.ppo": "lit_ft.stages.ppo_spec:PPOSpec",
    "model.sampling": "lit_ft.online.generation:SamplingSpec", "model (PPOModule)": "lit_ft.stages.ppo:PPOModule",
    "model.grpo": "lit_ft.stages.grpo_spec:GRPOSpec", "model (GRPOModule)": "lit_ft.stages.grpo:GRPOModule",
    "model.episodes": "lit_ft.online.episodes:EpisodeSpec",
    "model.distill": "lit_ft.stages.distill_spec:DistillSpec",
    "model (DistillModule)": "lit_ft.stages.distill:DistillModule",
    "data (InstructionDataModule)": "lit_ft.data.modules:InstructionDataModule",
    "data (PreferenceDataModule)": "lit_ft.data.modules:PreferenceDataModule",
    "data (PromptDataModule)": "lit_ft.data.modules:PromptDataModule",
    "data (UnpairedPreferenceDataModule)": "lit_ft.data.modules:UnpairedPreferenceDataModule",
}


def _source(section: str):
    import importlib

    module, name = SOURCES[section].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls if hasattr(cls, "__dataclass_fields__") else cls.__init__


def settings_table() -> str:
    """docs/data.md's table of allowed values, rendered from `RULES` and the Literal annotations."""
    lines = ["| section | setting | allowed |", "| --- | --- | --- |"]
    for section in dict.fromkeys(list(RULES) + list(SOURCES)):
        for name, rule in RULES.get(section, {}).items():
            lines.append(f"| {section} | `{name}` | {rule.text()} |")
        if section in SOURCES:
            for name, choices in _literals(typing.get_type_hints(_source(section))).items():
                lines.append(f"| {section} | `{name}` | one of {', '.join(f'`{c}`' for c in choices)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
