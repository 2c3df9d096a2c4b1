"""A training step's forward and backward replayed from CUDA graphs, one graph per batch shape.

On a small model the GPU finishes a step's kernels long before the host has queued them (SmolLM2-135M, 16 rows:
about 75 ms of kernels against 0.35 s of Python, dispatch and launches a step; BENCHMARKS.md). A CUDA graph records
the kernels of one forward and backward once and replays them with one launch, so the host work of a step becomes
the framework's and the optimizer's alone.

`CapturedGradients.run(fn, batch, fresh)` runs `fn(batch) -> (objective, *outputs)` and the backward of `objective`,
accumulating the parameters' gradients in place as `loss.backward()` does (onto zeros where `fresh`: the first
micro-batch of an optimizer step), and returns `outputs` (detached copies).
The first run is eager (it finds the trained parameters); a shape is captured when first seen (after `warmup` eager
runs of it), the first capture after one discarded warm-up pass on the capture stream (lazy initialisations happen
outside the graph), and replayed from then on. Every graph shares one memory pool, which the largest shape sizes: a
shape larger than every captured one drops the graphs and starts the pool again with it, so that the smaller shapes
reuse its memory (captured in growing order, each would add its own), and the eager passes' cached memory is given
back before the first capture. Memory is then about one step's at the largest shape. `release()` gives it back
(validation, which cannot use the pool, runs in between; the next steps capture again). What a captured step needs,
which the caller guarantees:

- tensors of the same shapes (pad each batch to a bucket: `pad_to_bucket`) and float numbers (a graph's input
  each: a loss scale may change between replays), and nothing that depends on the values: no
  boolean-mask indexing, no `.item()`, no host-side branch on a tensor (a capture that hits one fails, and the run goes
  on eagerly with one warning);
- one process (no collective inside the backward) and parameters that stay where they are;
- gradients bound once: each trained parameter's `.grad` is the same tensor for the whole run (set again after
  `zero_grad(set_to_none=True)`), so the graph's backward adds into it in place.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_ft.errors import ConfigError

__all__ = ["CapturedGradients", "pad_to_bucket", "check_capturable", "right_padded", "BUCKET"]

BUCKET = 64
"""Batches are padded to a multiple of this many tokens: a few graphs serve every length."""


def pad_to_bucket(batch: dict, values: dict[str, int], multiple: int = BUCKET) -> dict:
    """`batch` with each tensor named in `values` padded on the right of its last dimension to a multiple of
    `multiple`, with that value (e.g. labels -100, attention mask 0); other entries as they are."""
    out = dict(batch)
    for key, value in values.items():
        t = batch.get(key)
        if t is None:
            continue
        length = t.shape[-1]
        extra = math.ceil(length / multiple) * multiple - length
        if extra:
            out[key] = torch.nn.functional.pad(t, (0, extra), value=value)
    return out


def check_capturable(module, setting: str) -> None:
    """Refuse, naming `setting`, a run whose step a CUDA graph cannot record or would get wrong: no CUDA device,
    more than one process (a collective inside the backward), a loss scaler (`16-mixed`: it scales the loss
    Lightning hands to a backward the captured step does not run, then unscales the gradients)."""
    if module.device.type != "cuda":
        raise ConfigError(f"{setting}: needs a CUDA device (the module is on {module.device.type}); turn it off")
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ConfigError(f"{setting}: not with a loss scaler (trainer.precision {trainer.precision}); use "
                          f"bf16-mixed, bf16-true or 32-true, or turn it off")
    world = trainer.world_size if trainer is not None else 1
    if world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError(f"{setting}: one process only (the gradients' all-reduce runs inside the backward a graph "
                          f"would record; this run has {world}); turn it off")


def right_padded(mask: Tensor) -> bool:
    """Every row's padding (mask 0) is at its end (one wait for the GPU)."""
    return mask.shape[-1] < 2 or not bool((mask[:, 1:] > mask[:, :-1]).any())


def _key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(batch.items()) if isinstance(v, Tensor))


class _Graph:
    __slots__ = ("graph", "inputs", "outputs")

    def __init__(self, graph, inputs: dict, outputs: tuple):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class CapturedGradients:
    """Forward + backward of a training step, eager for a shape's first `warmup` runs, then replayed from a CUDA
    graph (up to `max_graphs` shapes; others stay eager).

    Args:
        params: the trained parameters (those that do not require grad are left out).
        warmup: eager runs of a shape before it is captured.
        max_graphs: shapes captured at most.
        setting: the setting that turned this on, named in the warning when a capture fails.
    """

    def __init__(self, params: Sequence[Tensor], warmup: int = 0, max_graphs: int = 32,
                 setting: str = "model.cuda_graphs"):
        self.params = [p for p in params if p.requires_grad]
        self.warmup, self.max_graphs, self.setting = warmup, max_graphs, setting
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: Counter = Counter()
        self.trained: list[Tensor] | None = None  # the parameters the objective reaches (found by the first run)
        self.grads: list[Tensor] | None = None  # their gradient tensors, bound to `.grad` for the whole run
        self.others: list[Tensor] = []  # the rest: reached by no captured step (a step's zeroing still clears them)
        self._where: tuple | None = None  # where the trained tensors were when the graphs were captured
        self._settle = False  # give the eager passes' cached memory back before the next capture
        self.failed: str | None = None
        self.replays = 0
        self.resets = 0
        self._largest = 0
        self._pool = None
        self._stream = None

    # -- gradients ------------------------------------------------------------------------------------------

    def _bind(self, fresh: bool) -> None:
        """Make every trained parameter's `.grad` its own gradient tensor: zeroed where `fresh` or where it was None,
        copied into where it is another tensor (accumulated before), left where it already is."""
        if fresh:
            for p, g in zip(self.trained, self.grads):
                p.grad = g
            for p in self.others:  # (what `zero_grad(set_to_none=True)` would do to them)
                p.grad = None
            if self.grads:
                torch._foreach_zero_(self.grads)
            return
        zero, dst, src = [], [], []
        for p, g in zip(self.trained, self.grads):
            current = p.grad
            if current is g:
                continue
            if current is None:
                zero.append(g)
            else:
                dst.append(g)
                src.append(current)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)

    def _first(self, fn: Callable, batch: dict, fresh: bool) -> tuple:
        """The first run: eager, finding which parameters the objective reaches (`backward()`, not
        `autograd.grad`: reentrant checkpointing hands its parameters' gradients to `.grad` only); their gradients
        become the bound tensors."""
        before = [None if fresh else p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        objective, *outputs = fn(batch)
        objective.backward()
        self.trained, self.grads = [], []
        for p, old in zip(self.params, before):
            if p.grad is None:
                p.grad = old
                self.others.append(p)
                continue
            if old is not None:
                p.grad += old
            self.trained.append(p)
            self.grads.append(p.grad)
        return tuple(o.detach() for o in outputs)

    # -- running --------------------------------------------------------------------------------------------

    def run(self, fn: Callable[[dict], tuple], batch: dict, fresh: bool = False) -> tuple:
        """`fn(batch)`'s outputs after its objective's backward (gradients accumulated into `.grad`; `fresh`: into
        zeros, what `zero_grad()` before `backward()` gives)."""
        if self.trained is None:
            self.seen[_key(batch)] += 1
            return self._first(fn, batch, fresh)
        self._bind(fresh)
        if self.graphs and self._where != self._location():
            self._reset()  # the module moved (a second fit after Lightning's teardown to the CPU): new addresses
        key = _key(batch)
        graph = self.graphs.get(key)
        if graph is None and self.failed is None and self.seen[key] >= self.warmup:
            graph = self._capture(fn, batch, key)
        self.seen[key] += 1
        if graph is None:
            objective, *outputs = fn(batch)
            objective.backward()
            return tuple(o.detach() for o in outputs)
        for name, static in graph.inputs.items():
            value = batch[name]
            static.copy_(value) if isinstance(value, Tensor) else static.fill_(value)  # (a number: no host copy)
        graph.graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in graph.outputs)

    def _location(self) -> tuple:
        return (self.trained[0].data_ptr(), self.grads[0].data_ptr()) if self.trained else ()

    def _reset(self) -> None:
        """Drop every graph and their pool (a new one for the next capture)."""
        self.graphs.clear()
        self._largest = 0
        torch.cuda.synchronize()
        self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.empty_cache()
        self.resets += 1

    def release(self) -> None:
        """Give the graphs' memory back (before validation, which cannot use the pool): the next training steps
        capture again, after the memory cached meanwhile is given back too."""
        if self.graphs:
            self._reset()
            self._settle = True

    def _capture(self, fn: Callable, batch: dict, key: tuple) -> _Graph | None:
        size = sum(v.numel() for v in batch.values() if isinstance(v, Tensor))
        if self.graphs and size > self._largest:
            self._reset()  # the largest shape first: the smaller ones fit in its memory
        if len(self.graphs) >= self.max_graphs:
            return None
        device = next(v.device for v in batch.values() if isinstance(v, Tensor))
        inputs = {k: v.clone() if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float32, device=device)
                  for k, v in batch.items() if isinstance(v, (Tensor, float))}
        static_batch = {**batch, **inputs}
        kept = [p.grad for p in self.trained]
        first = self._stream is None
        try:
            if first:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream()
                self._stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._stream):
                    # One discarded pass on the capture stream (lazy initialisations happen outside the graph).
                    for p in self.trained:
                        p.grad = None
                    objective, *_ = fn(static_batch)
                    objective.backward()
                    for p, g in zip(self.trained, kept):
                        p.grad = g
                    del objective, _
                torch.cuda.current_stream().wait_stream(self._stream)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # the eager passes' cached memory back before the pool takes its own
            torch.cuda.synchronize()
            if self._settle:  # (validation's cached memory, after `release`)
                torch.cuda.empty_cache()
                self._settle = False
            # Casts autocast cached in the pass above would enter the graph as constants: the weights' casts must
            # be recorded in it, to follow the weights.
            torch.clear_autocast_cache()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                objective, *outputs = fn(static_batch)
                objective.backward()
            torch.clear_autocast_cache()
        except Exception as e:  # a sync, a data-dependent shape or an uncapturable kernel in the step
            for p, g in zip(self.trained, kept):
                p.grad = g
            torch.clear_autocast_cache()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"{self.setting}: the step could not be captured in a CUDA graph ({self.failed.splitlines()[0]}); "
                          "it runs eagerly", stacklevel=3)
            return None
        g = _Graph(graph, inputs, tuple(o.detach() for o in outputs))
        self.graphs[key] = g
        self._largest = max(self._largest, size)
        self._where = self._location()
        return g
