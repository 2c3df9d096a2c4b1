"""One frozen base model, several LoRA adapters: the four roles of RLHF-PPO on a single set of base weights.

=========  ======================================================================================================
role       what runs
=========  ======================================================================================================
policy     trainable adapter ``policy``: a trainable copy of the SFT adapter, or a new LoRA
ref        frozen adapter ``ref`` (the SFT adapter), or the base with every adapter disabled when there is none
value      trainable adapter ``value`` + value head, both initialised from the reward adapter and its score head
           when one is given (Stiennon et al. 2020; Huang et al. 2024, "N+ implementation details"), else a new
           LoRA + zero head; or, with ``shared_trunk``, a head on the policy's own hidden states (no adapter)
reward     frozen adapter ``reward`` + frozen score head, read from an exported SEQ_CLS reward adapter
teacher    frozen adapter ``teacher``: on-policy distillation's teacher when it is an adapter of the same base
=========  ======================================================================================================

PEFT's ``set_adapter`` flips ``requires_grad``: it enables the adapter it activates (even a frozen one) and
disables the others (even trainable ones), and walks every module to do it. :class:`AdapterRoles` switches by
setting the active adapter on PEFT's layers directly (the state ``set_adapter`` leaves, without the walks) and keeps
the intended flags, so the optimizer, the checkpoint (which keeps ``requires_grad`` tensors only) and the gradients
stay right.
Only one adapter is active per forward; callers finish each role's backward before switching, which also keeps
gradient checkpointing (that re-runs the forward in backward) on the adapter that ran the forward.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_ft.errors import ConfigError, loading
from lit_ft.losses import entropy_from_logits, selective_log_softmax
from lit_ft.models import families
from lit_ft.models.adapters import ADAPTER_WEIGHTS, HEAD_NAME, RewardExport, check_adapter
from lit_ft.models.load import load_base, prepare_for_training
from lit_ft.models.lora import check_start, lora_config
from lit_ft.models.spec import LoraSpec, ModelSpec
from lit_ft.online import scoring

POLICY, REF, VALUE, REWARD, TEACHER = "policy", "ref", "value", "reward", "teacher"
_HEAD = HEAD_NAME


# ---------------------------------------------------------------------------------------------- reward export


def linear_head(hidden_size: int, weight: Tensor | None = None, bias: Tensor | None = None,
                trainable: bool = True) -> nn.Linear:
    """A 1-output fp32 head; zero-initialised without weights, so initial values are 0 (no random offsets)."""
    head = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(weight if weight is not None else torch.zeros(1, hidden_size))
        head.bias.copy_(bias if bias is not None else torch.zeros(1))
    head.requires_grad_(trainable)
    return head


# ---------------------------------------------------------------------------------------------- building


def _load_adapter_state(model, name: str, config, state: dict[str, Tensor]) -> None:
    from peft import set_peft_model_state_dict

    model.add_adapter(name, config)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
    if missing:
        raise ConfigError(f"adapter '{name}': the export lacks {len(missing)} LoRA tensors (e.g. {missing[0]})")


def build_roles(base: ModelSpec, lora: LoraSpec | None, sft_adapter: str | None, reward: RewardExport | None,
                value_model: str, device=None, frozen: dict[str, tuple[str, str]] | None = None):
    """The PEFT model holding every adapter of a PPO run; returns (model, trainable adapter names). `reward` comes
    from `lit_ft.models.adapters.read_reward_export`, which checked its base. `frozen`: more frozen adapters, role
    name -> (exported adapter directory, the setting that named it), each checked against the base (the
    distillation teacher `TEACHER`)."""
    from peft import PeftModel, get_peft_model

    check_start(lora, base, reference=True)
    model = prepare_for_training(load_base(base, "causal_lm", device), base)
    if sft_adapter is not None:
        check_adapter(sft_adapter, base.identity(), "model.sft_adapter")
        with loading(sft_adapter, "model.sft_adapter"):
            model = PeftModel.from_pretrained(model, sft_adapter, adapter_name=POLICY, is_trainable=True)
            model.load_adapter(sft_adapter, adapter_name=REF, is_trainable=False)
    elif lora is not None:
        model = get_peft_model(model, lora_config(lora, "causal_lm", model), adapter_name=POLICY)
    else:
        raise ConfigError("PPO needs a policy adapter: set sft_adapter or lora")
    trainable = [POLICY]
    for name, (path, setting) in (frozen or {}).items():
        check_adapter(path, base.identity(), setting)
        with loading(path, setting):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
    if reward is not None:
        frozen = copy.deepcopy(reward.config)
        frozen.inference_mode = True
        _load_adapter_state(model, REWARD, frozen, reward.lora_state)
    if value_model == "adapter":
        if reward is not None:
            cfg = copy.deepcopy(reward.config)
            cfg.inference_mode = False
            _load_adapter_state(model, VALUE, cfg, reward.lora_state)
        else:
            cfg = lora_config(lora, "causal_lm", model) if lora is not None else copy.deepcopy(model.peft_config[POLICY])
            cfg.inference_mode = False
            model.add_adapter(VALUE, cfg)
        trainable.append(VALUE)
    elif value_model not in ("shared_trunk", "none"):  # none: critic-free stages (GRPO, RLOO)
        raise ConfigError(f"value_model must be 'adapter' or 'shared_trunk', got {value_model!r}")
    model.train()  # from_pretrained / load_adapter leave eval mode; passes pick their mode explicitly
    return model, trainable


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to p=0 (LoRA and base): PPO's ratios and KL must compare the same function in the
    rollout, the old-log-prob pass and the update (Huang et al. 2024; Ziegler et al. 2019 train without dropout)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


# ---------------------------------------------------------------------------------------------- switching


class AdapterRoles:
    """Activates one role's adapter on the shared base and keeps the trainable adapters trainable."""

    def __init__(self, model, trainable: list[str]):
        self.model = model
        names = [n for n in model.peft_config]
        self.has_ref = REF in names
        self.has_reward = REWARD in names
        self.has_value_adapter = VALUE in names
        self._train, self._frozen = [], []
        for n, p in model.named_parameters():
            owner = next((a for a in names if f".{a}." in n or n.endswith(f".{a}")), None)
            (self._train if owner in trainable else self._frozen).append(p)
        self._modules_key, self._modules, self._fast = None, ([], []), True  # `_adapter_modules`: at the first switch
        self.restore_flags()

    def restore_flags(self) -> None:
        for p in self._train:
            p.requires_grad_(True)
        for p in self._frozen:
            p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self, role: str):
        """Run the block with `role`'s adapter active (the base alone for `ref` without an SFT adapter)."""
        if role == REF and not self.has_ref:
            with self.model.disable_adapter():
                yield self.model
            return
        self._switch(role)
        try:
            yield self.model
        finally:
            self._switch(POLICY)  # the policy is the resting state: generate() and save_adapter() expect it

    def _switch(self, role: str) -> None:
        """PEFT's `set_adapter` without its walks: it visits every module of the model twice and every adapter
        parameter to flip `requires_grad` (about 11 ms a switch for a 16-layer model on a CPU core, two switches
        a PPO minibatch), which `restore_flags` undoes anyway. The tuner layers and auxiliary wrappers are found
        once (again when the set of adapters changes); each layer gets the active adapter as `set_adapter` leaves
        it; the flags are then the roles' own."""
        if self.model.active_adapter == role:
            return
        if role not in self.model.peft_config:
            raise ValueError(f"Adapter {role} not found.")
        layers, wrappers = self._adapter_modules()
        if not self._fast:  # a PEFT whose layers keep their active adapter otherwise: its own (slower) switch
            self.model.set_adapter(role)
            self.restore_flags()
            return
        self.model.active_adapter = role  # what PeftModel.set_adapter and its tuner record
        self.model.base_model.active_adapter = role
        for m in wrappers:  # modules_to_save and the like: their own switch (a role without one disables them)
            name = m.check_set_adapter(role)
            m.set_adapter(name if name in m._adapters else [])
        for layer in layers:
            if layer.merged:  # never done to the shared model (the merged rollout engine keeps its own copy)
                raise RuntimeError("the shared model's adapters are merged: roles cannot switch")
            layer._active_adapter = [role]
        self.restore_flags()

    def _adapter_modules(self):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        key = tuple(self.model.peft_config)
        if self._modules_key != key:
            mods = list(self.model.modules())
            self._modules = ([m for m in mods if isinstance(m, BaseTunerLayer)],
                             [m for m in mods if isinstance(m, AuxiliaryTrainingWrapper)])
            self._modules_key = key
            # the PEFT internals the fast switch writes (peft 0.21-0.22); missing, PEFT's `set_adapter` switches
            self._fast = (all(isinstance(getattr(m, "_active_adapter", None), (list, str)) for m in self._modules[0])
                          and all(hasattr(m, "check_set_adapter") and hasattr(m, "_adapters")
                                  for m in self._modules[1]))
        return self._modules


# ---------------------------------------------------------------------------------------------- forwards


def sequence(prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor):
    """Left-padded prompt + right-padded response as one row: (ids, mask, position_ids)."""
    ids = torch.cat([prompt_ids, responses], dim=1)
    mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def trunk(model, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
    """Final hidden states [B, T, H] of the active adapter's decoder (the LM head is not run)."""
    decoder = model.get_base_model().get_decoder()
    return decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def response_hidden(hidden: Tensor, prompt_len: int) -> Tensor:
    """Hidden states that predict each response token (position t-1 predicts token t): [B, R, H]."""
    return hidden[:, prompt_len - 1 : -1]


def token_logprobs(model, hidden_r: Tensor, responses: Tensor, temperature: float, entropy: bool = False):
    """Log-probs [B, R] of the sampled tokens under logits / temperature (and the entropy [B, R] if asked).

    The logits are the model's own (`families.lm_logits`: head bias, logit scaling, soft-capping), as `generate`
    samples from them; made only for response positions; the softmax runs in row chunks (`selective_log_softmax`).
    """
    logits = families.lm_logits(model, hidden_r, temperature)
    logprobs = selective_log_softmax(logits, responses)
    if not entropy:
        return logprobs, None
    with torch.no_grad():  # a logged statistic: no graph (its [B, R, V] fp32 work would live until backward)
        return logprobs, entropy_from_logits(logits.detach())


def head_values(head: nn.Module, hidden: Tensor) -> Tensor:
    """A 1-output head over hidden states [..., H] -> [...] fp32 (in the head's dtype: under `bf16-true`
    Lightning casts the heads to bf16 too)."""
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def last_token_scores(head: nn.Module, hidden: Tensor, mask: Tensor) -> Tensor:
    """Head output at each row's last real token (from the attention mask: pad == EOS must not stop it)."""
    return scoring.scores_from_hidden(hidden.float(), mask, head)


def value_head_from(reward: RewardExport | None, hidden_size: int) -> nn.Linear:
    """Trainable value head: the reward head mapped to the normalized score scale (gain * head + bias), so the
    first values already estimate the score (Stiennon et al. 2020); a zero head without a reward model."""
    if reward is None:
        return linear_head(hidden_size)
    bias = reward.head_bias if reward.head_bias is not None else torch.zeros(1)
    return linear_head(hidden_size, reward.gain * reward.head_weight, reward.gain * bias.reshape(1) + reward.bias)


# ---------------------------------------------------------------------------------------------- export


def export_adapter(model, name: str, path: Path, head: nn.Linear | None = None) -> Path:
    """Write adapter `name` in PEFT format to `path` (loadable by `PeftModel.from_pretrained`).

    With `head`, the export is a SEQ_CLS adapter whose `score` head is `head` (the reward export format).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    if head is not None:
        config.task_type = "SEQ_CLS"
        state[f"base_model.model.{_HEAD}.weight"] = head.weight
        state[f"base_model.model.{_HEAD}.bias"] = head.bias
    config.save_pretrained(str(path))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return path


def export_value(model, head: nn.Linear, path: Path, has_adapter: bool) -> Path:
    """The value model: its adapter + head in the reward export format, or the head alone (shared trunk)."""
    if has_adapter:
        return export_adapter(model, VALUE, path, head)
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({f"{_HEAD}.weight": head.weight.detach().cpu().contiguous(),
               f"{_HEAD}.bias": head.bias.detach().cpu().contiguous()}, str(path / "value_head.safetensors"))
    return path
