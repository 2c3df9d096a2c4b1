"""The compiled layers' activation terms (`compile: true`) against what AOTAutograd's min-cut partitioner saves,
on the CPU: the decoder layers through `torch.compile` with the `aot_eager_decomp_partition` backend (inductor's
decompositions and partitioner, no code generation), the tensors still held for the backward counted through
`saved_tensors_hooks`, byte for byte against `plan_activations.trunk_saved(..., compiled=True)` with the LoRA
shape the planner reads off its meta model. Each case compiles once (about 10 s)."""

from __future__ import annotations

import pytest
import torch

from lit_ft.plan import activations as act
from lit_ft.plan import stages as plan_stages
from lit_ft.models import LoraSpec, ModelSpec, build_model, compile_decoder_layers
from lit_ft.plan import Settings
from lit_ft.train.optim import OptimSpec
from tests.test_plan import saved_bytes


def held_for_backward(fn, exclude: set[int]) -> tuple[int, object]:
    """Bytes of the distinct storages autograd holds for the backward once `fn` returns, those in `exclude`
    (weights and buffers) left out; and `fn`'s result."""
    seen, out = saved_bytes(fn)
    return sum(b for ptr, b in seen.items() if ptr not in exclude), out


@pytest.mark.parametrize("dtype,precision,dropout", [("bfloat16", "bf16-true", 0.05), ("bfloat16", "bf16-true", 0.0),
                                                     ("float32", "32-true", 0.05)])
def test_compiled_layers_save_what_the_partitioner_saves(tiny_model_dir, dtype, precision, dropout):
    """RMSNorm keeps its half input (not the fp32 cast), SwiGLU two of its three [n, I] tensors, dropout a bool
    mask; the rest as in eager. `*-true` is Lightning's cast of the whole module (adapters included)."""
    torch._dynamo.reset()
    lora = LoraSpec(dropout=dropout)
    model = build_model(ModelSpec(name_or_path=tiny_model_dir, dtype=dtype), lora)
    model.to(getattr(torch, dtype))
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    compile_decoder_layers(model, backend="aot_eager_decomp_partition")
    decoder = model.get_base_model().get_decoder()
    rows, seq = 3, 20
    ids = torch.randint(0, 100, (rows, seq), generator=torch.Generator().manual_seed(0))

    def forward():
        return decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state

    forward().sum().backward()  # the first call compiles
    measured, h = held_for_backward(forward, weights)
    h.sum().backward()
    s = Settings("sft", ModelSpec(name_or_path=tiny_model_dir, dtype=dtype), lora, OptimSpec(), rows, seq,
                 precision=precision, target="cpu", compile=True)
    d, _, _, shape, *_ = plan_stages.counted_model(s)
    a = torch.finfo(getattr(torch, dtype)).bits // 8
    planned = act.trunk_saved(d, rows, seq, a, shape, checkpointing=False, compiled=True)["layers"]
    assert measured == planned
    eager = act.trunk_saved(d, rows, seq, a, shape, checkpointing=False)["layers"]
    n = rows * seq
    # hand-derived difference: SwiGLU's silu output a layer, the half norm inputs (3 of them in-layer: the first
    # layer's input norm keeps nothing), the CPU's dtype-sized dropout masks become bool (9 of [n, H] and 2 of
    # [n, I] here: q/k/v of the first layer need no mask)
    masks = (9 * n * d.hidden + 2 * n * d.intermediate) * (a - 1) if dropout else 0
    assert eager - planned == d.layers * n * d.intermediate * a + 3 * n * d.hidden * (4 - a) + masks
