"""A preference pair as one sequence: its prompt once, both responses after it (`data.share_prompt`).

`lit_ft.data.collate.SharedPromptCollator` writes each pair as ``prompt | chosen | rejected`` with position ids that
go on from the prompt's end in both responses; here the attention mask that makes that sequence compute what the
two separate sequences ``prompt | chosen`` and ``prompt | rejected`` compute: every token sees the earlier tokens of
its own pair that are its prompt or its own response, so the rejected response never sees the chosen one. A pair
then costs ``P + C + R`` tokens instead of ``2P + C + R`` in every pass (DPO's policy and reference, a reward
model's forward), with the same log-probs and scores.

The mask is a 4-D additive tensor (0 / the dtype's lowest value, in the attention's dtype, rows 16-element aligned)
that transformers hands to SDPA or eager attention as it is, one for every layer; flash attention takes no such mask
and is refused. Sliding-window layers get the window applied by position (a dict of masks for models that mix full
and sliding layers). Models with other layers (recurrent, convolutional, chunked) or ALiBi positions are refused by
name (`takes`), and whether the loaded model really computes the separate sequences' states from the mask is probed
once on it (`check`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_ft.errors import ConfigError
from lit_ft.models.families import _unwrap, alibi_positions, attention_kinds, probing, sliding_window, states_agree

SETTING = "data.share_prompt"


def takes(config, attn_implementation: str = "auto") -> bool:
    """Whether a model of this config can run shared-prompt rows (what `--memory auto` turns `data.share_prompt` on
    for, and what `check` requires before its probe): SDPA or eager attention, full or sliding attention layers only
    (no recurrent, convolutional or chunked ones), positions from position ids (not ALiBi from a 2-D mask)."""
    return (attn_implementation in ("auto", "sdpa", "eager")
            and attention_kinds(config) <= {"full_attention", "sliding_attention"} and not alibi_positions(config))


def is_shared(batch) -> bool:
    """Whether a batch comes from `SharedPromptCollator`."""
    return isinstance(batch, dict) and "branch_ids" in batch


ALIGN = 16
"""Rows of the additive mask start at multiples of this many elements: torch's memory-efficient SDPA kernel pads
(copies) a mask whose rows are not aligned so, in every layer (`preprocess_mask` in its sources)."""


def _empty_mask(R: int, L: int, dtype: torch.dtype, device) -> Tensor:
    """[R, 1, L, L] additive mask, every position masked (the dtype's lowest value), in the dtype the attention
    computes in, its rows 16-element aligned: built once a forward and read as it is by every layer (SDPA would
    turn a boolean mask into this in each layer, and keep each copy for the backward)."""
    mask = torch.full((R, 1, L, -(-L // ALIGN) * ALIGN), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask[..., :L]


def _compute_dtype(inner) -> torch.dtype:
    """The dtype the attention scores come in: autocast's where it is on, else the weights'."""
    device = inner.get_input_embeddings().weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = inner.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def attention_mask(model, segment_ids: Tensor, branch_ids: Tensor, position_ids: Tensor):
    """The 4-D mask(s) of shared-prompt rows for this model's attention (see the module docstring)."""
    inner = _unwrap(model)
    config = inner.config
    impl = config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ConfigError(f"{SETTING}: needs attn_implementation sdpa or eager (a 4-D attention mask), the model "
                          f"runs {impl}; set {SETTING} false or model.base.attn_implementation sdpa")
    R, L = segment_ids.shape
    dtype = _compute_dtype(inner)
    window, kinds = sliding_window(config)
    windowed = window is not None and L > window  # else every distance is within the window: one mask is exact
    full = _empty_mask(R, L, dtype, segment_ids.device) if not windowed or kinds != {"sliding_attention"} else None
    slid = _empty_mask(R, L, dtype, segment_ids.device) if windowed else None
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    for r in range(R):  # a row at a time: the [L, L] temporaries of one row, not of the batch
        seg, branch = segment_ids[r], branch_ids[r]
        allowed = (seg[:, None] == seg[None, :]).logical_and_(causal)
        allowed.logical_and_((branch[:, None] == branch[None, :]).logical_or_(branch[None, :] == 0))
        allowed.fill_diagonal_(True)
        if full is not None:
            full[r, 0].masked_fill_(allowed, 0.0)
        if slid is not None:
            pos = position_ids[r].to(torch.int32)
            slid[r, 0].masked_fill_(allowed.logical_and_((pos[:, None] - pos[None, :]) < window), 0.0)
    if slid is None:
        return full
    return slid if full is None else {"full_attention": full, "sliding_attention": slid}


@torch.no_grad()
def check(model) -> None:
    """Probe once per attention implementation (remembered on the model) that a shared-prompt row gives each
    response the hidden states it gets after the prompt alone; a ConfigError naming the setting otherwise."""
    inner = _unwrap(model)
    impl = inner.config._attn_implementation
    if getattr(inner, "_lit_ft_shared_prompt_checked", None) == impl:
        return
    if impl in ("sdpa", "eager") and not takes(inner.config, impl):
        raise ConfigError(f"{SETTING}: {inner.config.model_type} has layers other than full or sliding attention, or "
                          f"ALiBi positions, which a shared-prompt row would mix across its responses; set {SETTING} "
                          "false")
    decoder = inner.get_decoder()
    emb = inner.get_input_embeddings().weight
    device, vocab = emb.device, emb.shape[0]
    prompt, chosen, rejected = [1, 2, 3], [4, 5], [6, 7, 8]
    row = torch.tensor([prompt + chosen + rejected], device=device) % vocab
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]], device=device)
    segments = torch.zeros_like(row)
    branches = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]], device=device)
    with probing(inner):
        try:
            shared = decoder(input_ids=row, position_ids=positions, use_cache=False,
                             attention_mask=attention_mask(model, segments, branches, positions)).last_hidden_state
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (a model whose forward cannot take the mask: named, not a traceback)
            raise ConfigError(f"{SETTING}: {inner.config.model_type} cannot run shared-prompt rows "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); set {SETTING} "
                              "false") from None
        alone = [decoder(input_ids=torch.tensor([prompt + side], device=device) % vocab,
                         use_cache=False).last_hidden_state[:, 3:] for side in (chosen, rejected)]
    if not states_agree(shared[:, 3:], torch.cat(alone, 1)):
        raise ConfigError(f"{SETTING}: {inner.config.model_type} with attn_implementation={impl} does not give a "
                          "response after a shared prompt the states it gets after the prompt alone (its layers "
                          f"do not follow the 4-D mask, or carry state along the row); set {SETTING} false")
    inner._lit_ft_shared_prompt_checked = impl


def decoder_inputs(model, batch: dict) -> tuple[Tensor, Tensor | dict, Tensor]:
    """(input ids, attention mask(s), position ids) of a shared-prompt batch for the decoder (the model probed
    first). The mask is kept in the batch for the next pass over it (DPO's reference, then its policy) while the
    attention's dtype is the same."""
    check(model)
    inner = _unwrap(model)
    key = (_compute_dtype(inner), inner.config._attn_implementation)
    if batch.get("_mask_key") != key:
        batch["_mask"] = attention_mask(model, batch["segment_ids"], batch["branch_ids"], batch["position_ids"])
        batch["_mask_key"] = key
    return batch["input_ids"], batch["_mask"], batch["position_ids"]
