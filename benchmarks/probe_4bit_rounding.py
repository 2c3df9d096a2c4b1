"""How far a rollout copy of a 4-bit (NF4) base is from the 4-bit layers themselves, on this machine.

The tiny random Llama of the tests, NF4 + double quant, an r=4 LoRA policy with random B, weights in `--dtype`
(`auto`: bf16 on CUDA, fp32 on the CPU): the greedy tokens of the static engine (plain 4-bit, merged copy,
de-quantized copy) against transformers' `generate`, and the largest difference of the last-position logits between
the 4-bit layers and each copy, with the top-2 gap of each row for scale.

    python benchmarks/probe_4bit_rounding.py            # on a CUDA machine (bitsandbytes' own 4-bit GEMM)
    python benchmarks/probe_4bit_rounding.py --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_ft.online.engine import DecodeEngine  # noqa: E402
from lit_ft.online.engine_ops import RolloutWeights  # noqa: E402
from lit_ft.online.generation import SamplingSpec, generate  # noqa: E402
from tests.conftest import make_tiny_llama, make_tokenizer  # noqa: E402
from tests.test_rollout import nf4_policy, prompts  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = tempfile.mkdtemp()
    make_tiny_llama(d, vocab_size=len(make_tokenizer(d)))
    tok = AutoTokenizer.from_pretrained(d)
    model = nf4_policy(d, device, lora_b=0.2, compute_dtype=args.compute_dtype, dtype=args.dtype)
    ids, mask = (t.to(device) for t in prompts(tok))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ref = generate(model, ids, mask, SamplingSpec(do_sample=False), eos, pad, max_new_tokens=6)[0]
    for kw in ({}, {"merged": True}, {"dequantize": True}):
        out = DecodeEngine(model, eos, pad, **kw).generate(ids, mask, 6, do_sample=False)[0]
        print(f"engine {kw or 'plain 4-bit'}: rows whose greedy tokens differ from generate's:",
              (out != ref).any(1).nonzero().flatten().tolist())
    with torch.no_grad():
        four = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        for merge in (True, False):
            with RolloutWeights(model, "policy", merge=merge).swapped_in():
                copy = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            print(f"max |4-bit - {'merged' if merge else 'de-quantized'}| logits per row:",
                  [round(v, 5) for v in (four - copy).abs().amax(1).tolist()])
    top = four.topk(2, dim=1).values
    print("top-2 logit gap per row (4-bit):", [round(v, 5) for v in (top[:, 0] - top[:, 1]).tolist()])
    print("device", device, "| weights", next(p.dtype for p in model.parameters() if p.is_floating_point()))


if __name__ == "__main__":
    main()
