"""Collators: lists of tokenized rows to tensor batches. Dataclasses, so DataLoader workers can pickle them.

Batch keys (the modules rely on exactly these):

- SFT: ``input_ids`` Long[B, T] right-padded with the pad id, ``attention_mask`` Long[B, T], ``labels``
  Long[B, T] (-100 on prompt tokens and padding; aligned with input_ids, the loss shifts).
- SFT packed: the same keys, plus ``position_ids`` Long[B, T] restarting at 0 for each packed sequence and
  ``seq_lens`` Long[num_seqs]; ``attention_mask`` is all ones (a model that sees ``position_ids`` and no mask
  can build the block-diagonal mask itself).
- Preference: ``input_ids`` Long[2B, T] (chosen rows 0..B-1, then rejected rows B..2B-1), right-padded,
  ``attention_mask``, ``margin`` Float[B] (0 where the data has none); from lit_ft's tokenized rows also ``labels``
  Long[2B, T] (the input ids on response tokens, -100 on the prompt and padding) and ``line`` Long[B] (each pair's
  source line, the key of DPO's precomputed reference log-probs).
- Preference packed: ``input_ids``, ``labels`` and ``position_ids`` Long[R, L] holding the 2B sequences packed
  padding-free (position ids restart at 0 for each), ``sequence_ids`` Long[R, L] (which of the 2B sequences each
  token belongs to, chosen 0..B-1 then rejected B..2B-1; -1 on the padding tail), ``attention_mask`` all ones,
  ``margin`` and ``line`` as above.
- Preference, shared prompt: each pair ONE sequence, its prompt once and both responses after it
  (:class:`SharedPromptCollator`): ``input_ids`` and ``position_ids`` Long[R, L] (both responses' positions go on
  from the prompt's end), ``segment_ids`` Long[R, L] (the pair of each token, -1 on padding) and ``branch_ids``
  Long[R, L] (0 prompt, 1 chosen, 2 rejected), from which `lit_ft.models.shared_prompt` builds the attention
  mask (the rejected response does not see the chosen one); ``logp_index`` Long[N] (the flat index into the R x L
  tokens of the position predicting each response token), ``logp_target`` Long[N] (that token) and
  ``logp_sequence`` Long[N] (its sequence: chosen 0..B-1, rejected B..2B-1); ``last_index`` Long[2B] (each
  sequence's last token, where a reward model reads its score); ``margin`` and ``line`` as above.
- Prompt: ``input_ids`` Long[B, T] LEFT-padded, ``attention_mask``, ``prompts`` list[str], ``answers`` list[str | None].
- Unpaired (KTO): ``input_ids``, ``attention_mask``, ``labels`` Long[B, T] (each example's prompt + completion,
  right-padded, -100 on the prompt), ``label`` Bool[B] (True: desirable), ``line`` Long[B] and ``example`` Long[B]
  (``2 * line + (0 if desirable else 1)``: unique also where a pair gave two examples of one line; the key of the
  precomputed reference log-probs); with two rows or more also ``kl_input_ids``, ``kl_attention_mask``,
  ``kl_labels`` Long[B, T'] (each prompt followed by another row's completion: the mismatched pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def _padded_length(longest: int, multiple: int | None) -> int:
    if multiple and longest % multiple:
        return longest + multiple - longest % multiple
    return longest


def pad_rows(rows: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    """Long[len(rows), length]: each row padded with ``value`` on the right (or left)."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: list[list[int]], length: int, left: bool = False) -> torch.Tensor:
    return pad_rows([[1] * len(r) for r in rows], 0, length, left)


@dataclass
class SFTCollator:
    """Right-padded SFT batches: ``input_ids``, ``attention_mask``, ``labels``."""

    pad_token_id: int
    """Id written into padding positions of ``input_ids`` (labels there are -100 whatever it is)."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this (tensor-core friendly shapes)."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        length = _padded_length(max(len(x) for x in ids), self.pad_to_multiple_of)
        return {
            "input_ids": pad_rows(ids, self.pad_token_id, length),
            "attention_mask": _mask(ids, length),
            "labels": pad_rows([r["labels"] for r in rows], IGNORE_INDEX, length),
        }


@dataclass
class PackedSFTCollator:
    """Padding-free SFT batches: the batch's sequences are packed first-fit decreasing (longest first, each into
    the first packed row with room) into rows of at most ``max_length``: fewer, fuller rows than packing in order.

    Position ids restart at 0 for each sequence, and the label of each sequence's first token is -100 so
    that no token is predicted from the previous sequence. Packed rows shorter than the longest are filled
    with pad tokens (labels -100, position ids continuing); ``seq_lens`` lists the real sequences only.
    """

    pad_token_id: int
    """Id for the tail that evens out packed rows of different lengths."""
    max_length: int
    """Longest packed row (rows are never longer than this after tokenization)."""
    pad_to_multiple_of: int | None = None
    """Round the packed length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        bins: list[list[dict]] = []
        room: list[int] = []
        for row in sorted(rows, key=lambda r: -len(r["input_ids"])):  # stable: equal lengths keep their order
            n = len(row["input_ids"])
            fit = next((i for i, free in enumerate(room) if n <= free), None)
            if fit is None:
                bins.append([row])
                room.append(self.max_length - n)
            else:
                bins[fit].append(row)
                room[fit] -= n
        ids, labels, positions, lens = [], [], [], []
        for b in bins:
            ids.append([t for r in b for t in r["input_ids"]])
            labels.append([t for r in b for t in [IGNORE_INDEX] + list(r["labels"][1:])])
            positions.append([p for r in b for p in range(len(r["input_ids"]))])
            lens += [len(r["input_ids"]) for r in b]
        length = _padded_length(max(len(x) for x in ids), self.pad_to_multiple_of)
        for p in positions:  # the padding tail counts on from 0 like one more (ignored) sequence
            p += list(range(length - len(p)))
        return {
            "input_ids": pad_rows(ids, self.pad_token_id, length),
            "attention_mask": torch.ones(len(bins), length, dtype=torch.long),
            "labels": pad_rows(labels, IGNORE_INDEX, length),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "seq_lens": torch.tensor(lens, dtype=torch.long),
        }


@dataclass
class PreferenceCollator:
    """Chosen-then-rejected batches: ``input_ids`` [2B, T] right-padded, ``attention_mask``, ``margin`` [B], and
    ``group`` (list of B subset names) when the data names subsets."""

    pad_token_id: int
    """Id written into padding positions."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        length = _padded_length(max(len(x) for x in ids), self.pad_to_multiple_of)
        margin = [float(r["margin"]) if r.get("margin") is not None else 0.0 for r in rows]
        batch = {
            "input_ids": pad_rows(ids, self.pad_token_id, length),
            "attention_mask": _mask(ids, length),
            "margin": torch.tensor(margin, dtype=torch.float),
        }
        if rows[0].get("group") is not None:
            batch["group"] = [r["group"] for r in rows]
        if rows[0].get("prompt_length") is not None:  # tokenized by lit_ft: DPO's completion-only labels
            batch["labels"] = pad_rows(preference_labels(rows), IGNORE_INDEX, length)
        if rows[0].get("line") is not None:
            batch["line"] = torch.tensor([int(r["line"]) for r in rows], dtype=torch.long)
        return batch


@dataclass
class PromptCollator:
    """Left-padded prompt batches for generation: ``input_ids``, ``attention_mask``, ``prompts``, ``answers``."""

    pad_token_id: int
    """Id written into padding positions (on the left, so every prompt ends where generation starts)."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        length = _padded_length(max(len(x) for x in ids), self.pad_to_multiple_of)
        return {
            "input_ids": pad_rows(ids, self.pad_token_id, length, left=True),
            "attention_mask": _mask(ids, length, left=True),
            "prompts": [r["prompt"] for r in rows],
            "answers": [r.get("answer") for r in rows],
        }


def preference_labels(rows: list[dict]) -> list[list[int]]:
    """Completion-only labels of the 2B sequences of preference rows (chosen rows, then rejected): -100 on the
    ``prompt_length`` shared prompt tokens, the token ids on the response (its closing EOS included)."""
    out = []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        for r in rows:
            n = int(r["prompt_length"])
            out.append([IGNORE_INDEX] * n + list(r[key][n:]))
    return out


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of ``capacity``: longest first, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # stable: equal lengths keep their order
        fit = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[fit].append(i)
            room[fit] -= lengths[i]
    return bins


@dataclass
class PackedPreferenceCollator:
    """Padding-free preference batches for DPO: the 2B chosen and rejected sequences packed first-fit decreasing
    into rows of at most ``max_length`` tokens, with restarting ``position_ids`` (no token attends across a
    sequence boundary) and ``sequence_ids`` mapping every token back to its sequence. Each sequence starts with
    prompt tokens (labels -100), so no label is predicted from the previous sequence of its row.

    Pays when responses vary in length: a padded batch computes ``2B x longest`` token slots, this one about the
    real tokens only. Same log-probs as :class:`PreferenceCollator` (tests/test_dpo.py).
    """

    pad_token_id: int
    """Id for the tail that evens out packed rows of different lengths."""
    max_length: int
    """Longest packed row; at least the longest sequence (the data module's ``max_length``)."""
    pad_to_multiple_of: int | None = None
    """Round the packed length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = preference_labels(rows)
        bins = first_fit_decreasing([len(s) for s in seqs], self.max_length)
        length = _padded_length(max(sum(len(seqs[i]) for i in b) for b in bins), self.pad_to_multiple_of)
        ids, lab, pos, owner = [], [], [], []
        for b in bins:
            ids.append([t for i in b for t in seqs[i]])
            lab.append([t for i in b for t in labels[i]])
            pos.append([p for i in b for p in range(len(seqs[i]))])
            owner.append([i for i in b for _ in seqs[i]])
            pos[-1] += list(range(length - len(pos[-1])))  # the padding tail counts on from 0, one ignored sequence
        batch = {
            "input_ids": pad_rows(ids, self.pad_token_id, length),
            "attention_mask": torch.ones(len(bins), length, dtype=torch.long),
            "labels": pad_rows(lab, IGNORE_INDEX, length),
            "position_ids": torch.tensor(pos, dtype=torch.long),
            "sequence_ids": pad_rows(owner, -1, length),
            "margin": torch.tensor([float(r["margin"]) if r.get("margin") is not None else 0.0 for r in rows]),
        }
        if rows[0].get("group") is not None:
            batch["group"] = [r["group"] for r in rows]
        if rows[0].get("line") is not None:
            batch["line"] = torch.tensor([int(r["line"]) for r in rows], dtype=torch.long)
        return batch


@dataclass
class SharedPromptCollator:
    """Preference batches with each pair's prompt computed once: the pair is one sequence ``prompt | chosen response
    | rejected response`` whose rejected tokens attend to the prompt and to themselves, not to the chosen response,
    and whose positions go on from the prompt's end in both responses; the first response token of each side is
    predicted from the prompt's last position (keys: the module docstring). The same log-probs as
    :class:`PreferenceCollator` (tests/test_shared_prompt.py) from ``P + C + R`` tokens a pair instead of
    ``2P + C + R``: DPO's policy and reference passes and a reward model's forward skip the prompt's second copy.

    ``max_length`` None: one pair a row, right-padded to the longest; else pairs packed first-fit decreasing into
    rows of at most ``max_length`` tokens (a pair longer than that takes a row of its own).
    """

    pad_token_id: int
    """Id written into padding positions."""
    max_length: int | None = None
    """Longest packed row (None: no packing, one pair a row)."""
    pad_to_multiple_of: int | None = None
    """Round the row length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        B = len(rows)
        units, sides = [], []  # each pair's token ids, and (prompt, chosen, rejected) lengths
        for r in rows:
            p = int(r["prompt_length"])
            c, j = list(r["chosen_input_ids"]), list(r["rejected_input_ids"])
            if c[:p] != j[:p]:
                raise ValueError(f"SharedPromptCollator: pair of line {r.get('line')} has chosen and rejected rows "
                                 f"that differ within their {p} prompt tokens")
            if not p and (len(c) == 0 or len(j) == 0):
                raise ValueError(f"SharedPromptCollator: pair of line {r.get('line')} has an empty side and no "
                                 "prompt: there is no token to score")
            units.append(c + j[p:])
            sides.append((p, len(c) - p, len(j) - p))
        if self.max_length is None:
            bins = [[i] for i in range(B)]
        else:
            bins = first_fit_decreasing([len(u) for u in units], self.max_length)
        length = _padded_length(max(sum(len(units[i]) for i in b) for b in bins), self.pad_to_multiple_of)
        ids, pos, seg, branch = [], [], [], []
        index, target, owner = [], [], []
        last = [0] * (2 * B)
        for row, b in enumerate(bins):
            start = row * length  # flat index of the row's first token
            ids.append([t for i in b for t in units[i]])
            pos.append([]), seg.append([]), branch.append([])
            for i in b:
                p, nc, nr = sides[i]
                off = start + len(pos[-1])  # flat index of this pair's first token
                pos[-1] += list(range(p + nc)) + list(range(p, p + nr))
                seg[-1] += [i] * (p + nc + nr)
                branch[-1] += [0] * p + [1] * nc + [2] * nr
                for seq, first, n in ((i, off + p, nc), (B + i, off + p + nc, nr)):
                    for k in range(0 if p else 1, n):  # token k of the response, from the position that predicts it:
                        index.append(first + k - 1 if k else off + p - 1)  # the prompt's last for the first token
                        target.append(units[i][first - off + k])
                        owner.append(seq)
                    last[seq] = first + n - 1 if n else off + p - 1
            pos[-1] += list(range(length - len(pos[-1])))
        batch = {
            "input_ids": pad_rows(ids, self.pad_token_id, length),
            "position_ids": torch.tensor(pos, dtype=torch.long),
            "segment_ids": pad_rows(seg, -1, length),
            "branch_ids": pad_rows(branch, 0, length),
            "logp_index": torch.tensor(index, dtype=torch.long),
            "logp_target": torch.tensor(target, dtype=torch.long),
            "logp_sequence": torch.tensor(owner, dtype=torch.long),
            "last_index": torch.tensor(last, dtype=torch.long),
            "margin": torch.tensor([float(r["margin"]) if r.get("margin") is not None else 0.0 for r in rows]),
        }
        if rows[0].get("group") is not None:
            batch["group"] = [r["group"] for r in rows]
        if rows[0].get("line") is not None:
            batch["line"] = torch.tensor([int(r["line"]) for r in rows], dtype=torch.long)
        return batch


def mismatched_partners(prompts: list[list[int]]) -> list[int]:
    """For each row i, the row whose completion follows row i's prompt in KTO's mismatched pairs: the completions
    shifted by one (row i - 1, the last row for row 0), or, where that row has the same prompt (the two examples of
    one pair sit side by side in an unshuffled split), the nearest row before it with another prompt; i - 1 when
    every row has i's prompt."""
    n = len(prompts)
    out = []
    for i in range(n):
        j = next((i - k for k in range(1, n) if prompts[(i - k) % n] != prompts[i]), i - 1)
        out.append(j % n)
    return out


@dataclass
class UnpairedCollator:
    """KTO batches (keys in the module docstring): the examples right-padded, and each prompt followed by another
    row's completion (`mismatched_partners`), cut from the left where that pair is longer than ``max_length``."""

    pad_token_id: int
    """Id written into padding positions."""
    max_length: int
    """Longest mismatched pair (the data's ``max_length``); longer ones keep the end of their prompt."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(r["input_ids"]) for r in rows]
        length = _padded_length(max(len(x) for x in ids), self.pad_to_multiple_of)
        label = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
        batch = {"input_ids": pad_rows(ids, self.pad_token_id, length), "attention_mask": _mask(ids, length),
                 "labels": pad_rows([r["labels"] for r in rows], IGNORE_INDEX, length), "label": label}
        if rows[0].get("line") is not None:
            batch["line"] = torch.tensor([int(r["line"]) for r in rows], dtype=torch.long)
            batch["example"] = 2 * batch["line"] + (~label).long()
        if len(rows) < 2:
            return batch  # no other row: no mismatched pair (the module then takes the KL estimate as 0)
        n = [int(r["prompt_length"]) for r in rows]
        prompts, completions = [x[:k] for x, k in zip(ids, n)], [x[k:] for x, k in zip(ids, n)]
        kl_ids, kl_labels = [], []
        for i, j in enumerate(mismatched_partners(prompts)):
            prompt = prompts[i][-max(1, self.max_length - len(completions[j])):]
            kl_ids.append(prompt + completions[j])
            kl_labels.append([IGNORE_INDEX] * len(prompt) + completions[j])
        kl_length = _padded_length(max(len(x) for x in kl_ids), self.pad_to_multiple_of)
        batch.update(kl_input_ids=pad_rows(kl_ids, self.pad_token_id, kl_length),
                     kl_attention_mask=_mask(kl_ids, kl_length),
                     kl_labels=pad_rows(kl_labels, IGNORE_INDEX, kl_length))
        return batch
