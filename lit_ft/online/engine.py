"""Rollouts at the speed of the hardware: a decode engine for online RL over the one-base multi-adapter model.

`DecodeEngine` samples responses for left-padded prompts with

- a static KV cache (transformers' `StaticCache`) allocated once for `batch x (prompt + max_new_tokens)` and reused
  by every rollout (smaller batches and shorter prompts are padded up to it, so the shapes never change);
- the prefill in one pass over the prompts, each distinct prompt once (GRPO's k copies of a prompt share it);
- a fixed-shape one-token decode step (`DecodeEngine.step`) that reads and writes only preallocated buffers, so
  on CUDA it is captured once into a CUDA graph and replayed for every token; on the CPU the same function runs
  eagerly (that is what the tests exercise);
- sampling (temperature, top-k, top-p) on the device, no host synchronisation per token: "all rows finished?" is
  read every `check_every` steps;
- an optional `merged` mode: the policy LoRA is merged into a rollout copy of the LoRA-wrapped weights (4-bit bases:
  de-quantized into it; refreshed at the start of every rollout, so it follows each optimizer update), and the step
  runs plain matmuls with the policy's LoRA branches off; or, for 4-bit bases, `dequantize`: the copy holds the base
  weights de-quantized once a rollout and the LoRA branches stay on (the 4-bit layers' de-quantized weights).

What is hand-written here, and why transformers/torch could not do it:

- HF `generate` cannot be captured: its loop reads `unfinished_sequences.max() == 0` on the host every token, and
  its mask builder checks the padding mask on the host outside `torch.compile`. The loop, the stopping check and
  the sampling (Gumbel-max over the filtered logits, graph-safe RNG) are therefore ours; the model forward, the
  logits (the model's own LM head and post-processing, via `logits_to_keep=1`) and the `StaticCache` are theirs.
- Decode attention (`rollout_ops.grouped_decode_attention`, registered with transformers' `AttentionInterface`
  and switched on only during a rollout): with a mask, transformers' sdpa path repeats the KV heads to the query heads
  (`repeat_kv`), which for grouped-query models copies the whole cache 4x every layer of every step; folding the
  query heads of a group into the query-length axis lets SDPA read each cached head once.
- The attention mask is built here as a 4D tensor (transformers passes a 4D mask through unchanged) from device
  tensors, so the decode step has no data-dependent host code.
- `torch.compile(mode="reduce-overhead")` would trace PEFT's per-layer Python branches over the active adapters
  and guard on them; switching to the reference/reward/value adapters between rollouts would recompile or break
  the graph. Capturing the step directly with `torch.cuda.CUDAGraph` records the policy's kernels once, whatever
  adapter is active later.
- `compile=True` (`SamplingSpec.compile`): the step's model forward goes through `torch.compile` (inductor, no CUDA
  graphs of its own) before the capture: one graph for the first cache size, and after the first reallocation one
  with symbolic sizes (dynamo's automatic dynamic shapes) that serves every later size, so growing prompts never
  reach dynamo's recompile limit. A graph replays launches for free, but each of the ~40
  small kernels a decoder layer runs eagerly (the norms' reductions, rotary, the residual adds, SiLU x up) still
  takes a few microseconds at decode sizes, which is most of the step at batch 64 on a 1B model; inductor fuses
  them. It compiles only while the engine's context holds (the policy adapter active, merged mode's copy swapped in,
  grouped attention), so the guards see one state; the sampling stays eager (graph-safe RNG). A model inductor cannot
  compile decodes eagerly, with a warning.
- PEFT's `merge_adapter` writes the merge into the shared base weights, which the reference, reward and value
  roles read too; the merged mode keeps its own copy (`engine_ops.RolloutWeights`) and swaps it in for the rollout
  only (`RolloutWeights.swapped_in`).

Validity: the captured graph reads the parameters' storage; before every replay series the engine compares the
parameters' data pointers with those at capture and recaptures when any moved (optimizer steps update in place,
so after an update the graph already reads the new weights; the merged copy is recomputed every rollout).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_ft.online.generation import cache_argument
from lit_ft.losses import first_true_index, response_mask_after_eos
from lit_ft.online.engine_ops import (GROUPED_SDPA, RolloutWeights, engine_unsupported, filter_logits,
                               register_grouped_attention)

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS workspaces, lazy inits), as torch advises


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile a function (not errors of the computation itself)."""
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:  # older torch: inductor's errors arrive as BackendCompilerFailed
        pass
    return tuple(errors)


COMPILE_ERRORS = _compile_errors()


class DecodeEngine:
    """Batched sampling with a static KV cache and a fixed-shape decode step (CUDA-graph replay on CUDA).

    `generate(input_ids, attention_mask, ...)` -> (responses [B, R], mask [B, R], logprobs [B, R]); responses are
    pad after the first EOS and masked out, like `lit_ft.online.generation.generate`; logprobs are the sampled tokens'
    log-probs under logits / temperature (the full distribution, what PPO's ratios use), 0 where masked.
    """

    def __init__(self, model, eos_token_id: int, pad_token_id: int, adapter: str | None = "policy",
                 merged: bool = False, cuda_graph: bool = True, check_every: int = 8, compile: bool = False,
                 dequantize: bool = False):
        reason = engine_unsupported(model)
        if reason is not None:
            raise ValueError(f"the decode engine cannot serve this model: {reason}")
        self.model, self.eos, self.pad, self.check_every = model, eos_token_id, pad_token_id, max(1, check_every)
        self.peft = hasattr(model, "get_base_model")
        self.base = model.get_base_model() if self.peft else model
        self.adapter = adapter if self.peft else None
        self.cuda_graph = cuda_graph
        self.impl = self.base.config._attn_implementation
        if self.impl == "sdpa":
            register_grouped_attention()
        self.cache_kw = cache_argument(self.base)
        # the rollout copy of the policy's weights (merged, or a 4-bit base de-quantized): `sampling.merged/dequantize`
        self.weights = (RolloutWeights(model, self.adapter, merge=merged)
                        if (merged or dequantize) and self.peft and self.adapter else None)
        # the decode step's forward through inductor (static sizes first, symbolic ones after a reallocation); None:
        # eager
        self.compiled = torch.compile(self._forward) if compile else None
        self.shape = None  # (batch, prompt_len, max_new) the buffers are allocated for
        self.graphs: dict = {}
        self._ptrs = None

    # -- buffers ----------------------------------------------------------------------------------------------

    def _allocate(self, batch: int, prompt_len: int, max_new: int, device) -> None:
        from transformers import StaticCache

        batch, prompt_len, max_new = self.grown(batch, prompt_len, max_new)
        L = prompt_len + max_new
        reason = engine_unsupported(self.model, L)
        if reason is not None:  # a sliding window shorter than the cache
            raise ValueError(f"the decode engine cannot serve this model: {reason}")
        rank_zero_info(f"decode engine: static KV cache for {batch} rows x {L} positions")
        self.shape, self.graphs = (batch, prompt_len, max_new), {}
        self.cache = StaticCache(config=self.base.config, max_cache_len=L)
        z = dict(device=device, dtype=torch.long)
        self.tok, self.pos, self.t = torch.zeros(batch, 1, **z), torch.zeros(batch, 1, **z), torch.zeros((), **z)
        self.prompt_ok = torch.zeros(batch, L, dtype=torch.bool, device=device)
        self.cols = torch.arange(L, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, max_new, **z)
        self.out_logp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)

    def grown(self, batch: int, prompt_len: int, max_new: int) -> tuple[int, int, int]:
        """The buffers' shape after a rollout of this shape: they only grow (smaller rollouts are padded up)."""
        old = self.shape or (0, 0, 0)
        return max(batch, old[0]), max(prompt_len, old[1]), max(max_new, old[2])

    def _mask(self, visible: Tensor) -> Tensor:
        """A boolean visibility [B, 1, Q, L] as the attention implementation takes it (sdpa: bool, eager: additive)."""
        if self.impl == "sdpa":
            return visible
        dtype = self.base.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=visible.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)

    # -- forward, sampling, the step ---------------------------------------------------------------------------

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor, cache=None) -> Tensor:
        """Last-position logits [B, V] fp32 from the model's own forward (its LM head and logit processing), writing
        the keys and values into `cache` (the engine's static cache unless given)."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        kwargs[self.cache_kw] = self.cache if cache is None else cache
        return self.base(**kwargs).logits[:, -1].float()

    def _emit(self, logits: Tensor) -> None:
        """Sample from logits [B, V], write the token and its log-prob at column t, advance t (all on the device)."""
        s = self.sampling
        scaled = logits / s["temperature"] if s["temperature"] != 1.0 else logits
        # log p(token) = scaled[token] - logsumexp(scaled): one read of the [B, V] logits, no log-softmax written
        lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
        if not s["do_sample"]:
            nxt = logits.argmax(-1)
        else:
            # Gumbel-max (argmax of logits - log E, E ~ Exp(1)) draws from softmax(logits) like multinomial, with
            # graph-safe RNG and no normalisation pass.
            filt = filter_logits(scaled, s["top_k"], s["top_p"])
            nxt = (filt - torch.empty_like(filt).exponential_().log()).argmax(-1)
        nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
        col = self.t.view(1)
        self.out.index_copy_(1, col, nxt[:, None])
        self.out_logp.index_copy_(1, col, (scaled.gather(1, nxt[:, None]) - lse).float())  # autocast may lower it
        self.finished |= nxt == self.eos
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.t.add_(1)

    def step(self) -> None:
        """The fixed-shape one-token decode step: feed `tok` (response token t-1, cache slot prompt_len + t - 1),
        emit token t. Reads and writes only the engine's buffers and the cache: eager on the CPU, captured on CUDA."""
        p = self.shape[1]
        visible = self.prompt_ok | ((self.cols >= p) & (self.cols < p + self.t))
        self._emit(self._step_forward(self.tok, self.pos, self._mask(visible[:, None, None, :])))

    def _step_forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """The step's forward: compiled where asked; a failed compilation (raised before the graph runs, so the
        cache is untouched) leaves the engine eager for good."""
        if self.compiled is None:
            return self._forward(ids, positions, mask)
        try:
            return self.compiled(ids, positions, mask)
        except COMPILE_ERRORS as e:
            log.warning("decode engine: torch.compile failed on this model (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compiled = None
            return self._forward(ids, positions, mask)

    def _prefill(self, ids: Tensor, mask: Tensor) -> None:
        """One pass over the (padded) prompts [B, P] into cache slots [0, P), over each distinct prompt once; emits
        the first token."""
        self.cache.reset()  # zeroes the cache in place and rewinds its write position (storage kept)
        B, P = ids.shape
        self.prompt_ok.zero_()
        self.prompt_ok[:, :P] = mask.bool()
        self.finished.zero_()
        self.out.fill_(self.pad)
        self.out_logp.zero_()
        self.t.zero_()
        self.pos.copy_(mask.sum(1, keepdim=True) - 1)  # _emit adds 1: the first response token sits at n_real
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        q = self.cols[:P, None]
        # causal over real keys; a pad query sees itself only (a fully masked row would give NaN states)
        visible = (self.cols[None, :] <= q) & (self.prompt_ok[:, None, :] | (self.cols[None, :] == q))
        distinct, inverse = torch.unique(torch.cat([ids, mask.long()], 1), dim=0, return_inverse=True)
        if len(distinct) == B:
            self._emit(self._forward(ids, positions, self._mask(visible[:, None])))
            return
        # Copies of a prompt (GRPO's k samples, the rows padded up to the allocation): one pass over each distinct
        # prompt into a cache of its own, whose keys and values then fill every copy's slots through the static
        # cache's own `update` (which keeps each layer kind's bookkeeping); the copies sample independently.
        from transformers import DynamicCache

        first = torch.zeros(len(distinct), dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(B, device=ids.device), "amin", include_self=False)
        prefix = DynamicCache(config=self.base.config)
        logits = self._forward(ids[first], positions[first], self._mask(visible[first, None, :, :P]), prefix)
        for layer, small in zip(self.cache.layers, prefix.layers):
            if getattr(small, "keys", None) is None:  # a layer that reads another's cache (Gemma 4's KV sharing)
                continue
            layer.update(small.keys.index_select(0, inverse), small.values.index_select(0, inverse))
        del prefix
        self._emit(logits.index_select(0, inverse))

    # -- graphs ------------------------------------------------------------------------------------------------

    def _params_signature(self):
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _graph(self, key):
        """The captured step for these sampling settings; None where graphs do not apply (CPU, switched off)."""
        if not (self.cuda_graph and self.tok.is_cuda):
            return None
        sig = self._params_signature()
        if sig != self._ptrs:  # weights moved (reloaded, re-cast): every captured graph reads stale storage
            self.graphs, self._ptrs = {}, sig
        if key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the warm-up steps are real decode steps of this rollout
                for _ in range(WARMUP_STEPS):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                pool = next(iter(self.graphs.values())).pool() if self.graphs else None
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.step()  # recorded, not run
            except RuntimeError as e:  # keep the rollout going; the step still runs without host syncs
                log.warning("decode engine: CUDA graph capture failed (%s); decoding eagerly", e)
                self.cuda_graph = False
                return None
            self.graphs[key] = graph
            rank_zero_info(f"decode engine: captured the decode step {key}")
        return self.graphs[key]

    # -- the rollout -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        if attention_mask[:, -1].min() == 0:
            raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
        B, P = input_ids.shape
        if self.shape is None or B > self.shape[0] or P > self.shape[1] or max_new_tokens > self.shape[2]:
            self._allocate(B, P, max_new_tokens, input_ids.device)
        ids, mask = self._pad_to_shape(input_ids, attention_mask)
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        key = tuple(self.sampling.values())
        with self._policy_context():  # merged: the copy recomputed, so it follows the last optimizer update
            self._prefill(ids, mask)
            graph = self._graph(key) if max_new_tokens - 1 > WARMUP_STEPS else None
            done = int(self.t)  # 1, or more when the capture's warm-up steps decoded
            while done < max_new_tokens and not bool(self.finished[:B].all()):  # one host sync per chunk
                n = min(self.check_every, max_new_tokens - done)
                for _ in range(n):
                    graph.replay() if graph is not None else self.step()
                done += n
        return self._result(B, done)

    def _pad_to_shape(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Left-pad the prompts to the allocated prompt length and repeat row 0 up to the allocated batch."""
        B, P = ids.shape
        rows, width = self.shape[0], self.shape[1]
        ids = torch.nn.functional.pad(ids, (width - P, 0), value=self.pad)
        mask = torch.nn.functional.pad(mask.long(), (width - P, 0), value=0)
        if B < rows:
            ids = torch.cat([ids, ids[:1].expand(rows - B, -1)])
            mask = torch.cat([mask, mask[:1].expand(rows - B, -1)])
        return ids, mask

    def _result(self, B: int, done: int):
        responses, logp = self.out[:B, :done].clone(), self.out_logp[:B, :done].clone()
        mask = response_mask_after_eos(responses, self.eos, self.pad)
        if bool(self.finished[:B].all()):  # every row ended with EOS: as long as the longest, like HF generate
            width = int(first_true_index(responses == self.eos).max()) + 1
            responses, logp, mask = responses[:, :width], logp[:, :width], mask[:, :width]
        mask = mask.long()
        return responses.masked_fill(mask == 0, self.pad), mask, logp * mask

    @contextlib.contextmanager
    def _policy_context(self):
        """Grouped decode attention on, the policy adapter active (merged mode: its merged copy swapped in, its LoRA
        branches off), under a fresh autocast without its weight-cast cache (a captured graph must recompute the
        casts on replay); the `requires_grad` flags PEFT's switches flip are restored afterwards."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        dev = self.tok.device.type
        autocast = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if autocast else None
        try:
            with contextlib.ExitStack() as stack:
                if autocast:
                    stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=False))
                if self.impl == "sdpa":
                    self.base.set_attn_implementation(GROUPED_SDPA)
                    stack.callback(self.base.set_attn_implementation, "sdpa")
                if self.peft and self.adapter is not None and self.model.active_adapter != self.adapter:
                    previous = self.model.active_adapter
                    self.model.set_adapter(self.adapter)
                    stack.callback(self.model.set_adapter, previous)
                if self.weights is not None:
                    stack.enter_context(self.weights.swapped_in())
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
