"""Activation offloading: the tensors autograd saves during a training forward move to host memory and come back
for the backward (`torch.autograd.graph.saved_tensors_hooks`), so the GPU holds a layer's activations only while it
works on that layer. What TRL, Axolotl, torchtune and Unsloth call activation offloading.

On CUDA the copies run on a side stream into pinned host buffers, so the device-to-host copy of one layer overlaps
the next layer's compute; the backward brings a tensor back when autograd asks for it (the wait is where it costs
time, measured in BENCHMARKS.md). With gradient checkpointing, nothing inside a checkpointed layer reaches these
hooks (reentrant: its first forward saves nothing; non-reentrant: checkpointing's own hooks own it), so only what
crosses the layer boundaries (each layer's input, kept for the recompute) does: the two compose, checkpointing
cutting the number of saved tensors, offloading moving the rest.

Not offloaded: the model's parameters and buffers (autograd saves the frozen weights of every matmul; they stay on
the device anyway), tensors below `min_bytes` (copies of small tensors cost more than they save), and anything in a
no-grad forward (nothing is saved there). On the CPU (tests) `copy_on_cpu` makes the hooks copy anyway, so the
numerics of the round trip are checked where no GPU is.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BYTES = 1 << 20  # 1 MiB: smaller saved tensors stay where they are


class ActivationOffload:
    """Saved-tensor hooks for one model: `with offload.active():` around a forward (or `install`: every forward of a
    module)."""

    def __init__(self, model: nn.Module, min_bytes: int = MIN_BYTES, copy_on_cpu: bool = False):
        self.model, self.min_bytes, self.copy_on_cpu = model, min_bytes, copy_on_cpu
        self.offloaded_bytes = 0  # over the current forward (reset by `active`)
        self._stream = None
        self._kept: set[int] | None = None  # the storages of the parameters and buffers, read at the first copy

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        if self._kept is None:
            self._kept = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        return tensor.untyped_storage().data_ptr() in self._kept

    def active(self):
        """The hooks for one forward (the weights' storages are read again: they move with `.to()`)."""
        self.offloaded_bytes, self._kept = 0, None
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _stream_for(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        on_cuda = tensor.device.type == "cuda"
        if (nbytes < self.min_bytes or not (on_cuda or self.copy_on_cpu) or tensor.layout != torch.strided
                or self._is_weight(tensor)):
            return tensor
        self.offloaded_bytes += nbytes
        if not on_cuda:  # the CPU's stand-in: a copy in other memory, what the round trip must survive
            return ("host", tensor.device, tensor.clone(memory_format=torch.preserve_format))
        stream = self._stream_for(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written before it is read
        with torch.cuda.stream(stream):
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        event = stream.record_event()
        return ("host", tensor.device, host, event)

    def _unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        if len(packed) == 3:  # CPU stand-in
            return packed[2]
        _, device, host, event = packed
        event.synchronize()  # the device-to-host copy is done before the buffer is read back
        return host.to(device, non_blocking=True)


def install(model: nn.Module, decoder: nn.Module | None = None, **kwargs) -> ActivationOffload:
    """Offload during every grad-enabled forward of `decoder` (default: the model's decoder stack), the part of
    the forward whose saved tensors dominate; the loss head stays outside (lit_ft's losses chunk their logits)."""
    decoder = decoder if decoder is not None else _decoder(model)
    offload = ActivationOffload(model, **kwargs)
    contexts = []

    def enter(module, args):
        if torch.is_grad_enabled():
            ctx = offload.active()
            ctx.__enter__()
            contexts.append(ctx)

    def leave(module, args, output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    decoder.register_forward_pre_hook(enter)
    decoder.register_forward_hook(leave, always_call=True)  # an exception in the forward leaves no hooks behind
    model.lit_ft_offload = offload
    return offload


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack every forward goes through: `get_decoder()` (OPT's causal LM calls `model.decoder`
    directly, past its `base_model_prefix` module), else the prefix module."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = inner.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
