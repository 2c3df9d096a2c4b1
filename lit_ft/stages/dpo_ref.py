"""The offline stages' log-probs (DPO, KTO): per-sequence sums over response tokens, and the reference's, computed
once and kept.

`sequence_logps` runs the active adapter over a preference batch (padded or packed, `lit_ft.data.collate`; or any
padded batch of completion-only labelled rows, as KTO's) and sums each sequence's response-token log-probs.
`ReferenceTable` holds the reference's sums of every row of a dataset (a DPO pair: both sides; a KTO example: its
completion), keyed by the dataset's fingerprint (`dataset_digest`: a SHA-256 of its tokenized rows), so a run can precompute them
once before training (`DPOSpec.precompute_ref`) and a resumed run reads them from its checkpoint instead of
recomputing them; a changed dataset has another digest and is computed afresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_ft.models import families, shared_prompt

from lit_ft.online import roles
from lit_ft.errors import ConfigError

IGNORE_INDEX = -100
DIGEST_COLUMNS = ("chosen_input_ids", "rejected_input_ids", "prompt_length", "line")


def sequence_logps(model, batch: dict, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(log-prob sums [S], response token counts [S]) of the S = 2B sequences of a preference batch under the
    active adapter: chosen sequences 0..B-1, then rejected ones.

    One forward over every sequence (chosen and rejected concatenated, as TRL's `concatenated_forward`). Logits are
    made only at response positions (labels != -100) and in chunks of `chunk_size` positions, each recomputed in
    backward (non-reentrant checkpointing), so at most `chunk_size x V` logits exist at once. Packed batches
    (`position_ids`, `sequence_ids`) run without an attention mask: transformers builds the block-diagonal causal
    mask from the restarting position ids, as for packed SFT (probed once, `families.check_packing`). Shared-prompt
    batches (`data.share_prompt`: each pair one row, `lit_ft.models.shared_prompt`) carry the positions and targets
    of their response tokens (no host sync).
    """
    if shared_prompt.is_shared(batch):  # each pair one row: the collator says which position predicts which token
        hidden = roles.trunk(model, *shared_prompt.decoder_inputs(model, batch))
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["logp_index"])
        targets, seq, n_seq = batch["logp_target"], batch["logp_sequence"], 2 * batch["margin"].shape[0]
    else:
        h, targets, seq, n_seq = _response_states(model, batch)

    def chunk(h_chunk: Tensor, t_chunk: Tensor) -> Tensor:
        # The model's own logits (head bias, scaling, soft-capping) and log p(target) = x_t - logsumexp(x), fp32.
        # No checkpoint inside this checkpointed chunk: torch 2.11's nested non-reentrant checkpoints save a
        # placeholder of the default dtype, which Lightning's bf16-true changes only during the forward (the
        # recompute then fails its metadata check), and the inner one would recompute the chunk a second time.
        logits = families.lm_logits(model, h_chunk)
        return logits.gather(-1, t_chunk[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    grad = torch.is_grad_enabled() and h.requires_grad
    parts = [checkpoint(chunk, hc, tc, use_reentrant=False, preserve_rng_state=False) if grad else chunk(hc, tc)
             for hc, tc in zip(h.split(chunk_size), targets.split(chunk_size))]
    logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    counts = torch.zeros(n_seq, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts  # (index_add, not bincount: bincount reads its length on the host)


def _response_states(model, batch: dict) -> tuple[Tensor, Tensor, Tensor, int]:
    """(hidden states [N, H] predicting the N response tokens, those tokens [N], their sequences [N], sequences) of
    a padded or packed preference batch: position t predicts token t + 1 of the same row where its label is kept."""
    ids, labels = batch["input_ids"], batch["labels"]
    packed = "position_ids" in batch
    if packed:
        families.check_packing(model)  # once: does this attention derive masks from position_ids?
    hidden = roles.trunk(model, ids, None if packed else batch["attention_mask"], batch.get("position_ids"))
    if packed:
        owner, n_seq = batch["sequence_ids"], 2 * batch["margin"].shape[0]
    else:
        owner = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        n_seq = ids.shape[0]
    keep = labels[:, 1:] != IGNORE_INDEX
    # The response positions found once (one host sync for their number) and gathered by index: a boolean mask per
    # tensor would synchronise once each.
    at = keep.reshape(-1).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, at)
    return h, labels[:, 1:].reshape(-1)[at], owner[:, 1:].reshape(-1)[at], n_seq


def dataset_digest(dataset, columns: tuple[str, ...] = DIGEST_COLUMNS,
                   setting: str = "model.dpo.precompute_ref") -> str:
    """SHA-256 of a tokenized dataset's rows in order: the `columns` (DPO's: token ids, prompt lengths, source
    lines)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"{setting}: the dataset lacks the columns {missing} (lit_ft's DataModules write them)")
    h = hashlib.sha256()
    values = [dataset[c] for c in columns]
    for row in zip(*values):
        h.update(json.dumps(row, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class ReferenceTable:
    """The reference's log-prob sums of every row of one dataset: `logps` [N, K] (DPO: chosen, rejected; KTO: the
    completion), by `lines` (the batch key the table was computed under: DPO's `line`, KTO's `example`)."""

    digest: str
    lines: Tensor
    logps: Tensor

    def __post_init__(self):
        self._row = {int(line): i for i, line in enumerate(self.lines.tolist())}

    def lookup(self, lines: Tensor, setting: str = "model.dpo.precompute_ref") -> tuple[Tensor, ...]:
        """The K columns ([B] each; DPO: ref chosen, ref rejected) of the rows with these keys."""
        try:
            idx = torch.tensor([self._row[int(x)] for x in lines.tolist()], dtype=torch.long)
        except KeyError as e:
            raise ConfigError(f"{setting}: no reference log-probs for the row of key {e}; the batches do not come "
                              "from the dataset they were computed for") from None
        return tuple(self.logps[idx].to(lines.device).unbind(1))

    def state(self) -> dict:
        return {"digest": self.digest, "lines": self.lines.cpu(), "logps": self.logps.cpu()}

    @classmethod
    def from_state(cls, state: dict) -> "ReferenceTable":
        return cls(state["digest"], state["lines"], state["logps"])


@torch.no_grad()
def compute_table(module, dataset, collate, batch_size: int, digest: str, key: str = "line") -> ReferenceTable:
    """One no-grad pass of `module.reference_logps` (a tuple of [B] columns) over `dataset` in order, in batches
    made by `collate`, keyed by the batch's `key`."""
    lines, logps = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in collate(rows).items()}
        lines.append(batch[key].cpu())
        logps.append(torch.stack(list(module.reference_logps(batch)), dim=1).float().cpu())
    return ReferenceTable(digest, torch.cat(lines), torch.cat(logps))
