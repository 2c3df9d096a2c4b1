"""What `--memory auto` chooses for the d1 DPO workload (`bench_dpo.py`: Llama-3.2-1B shape, 8 pairs of a 1024-token
prompt and two 1024-token responses, 211 steps) at a budget, with and without shared-prompt rows, and the step-time
model's seconds and the plan's total for each. CPU only: the model's config, no weights.

    python benchmarks/plan_shared.py --budget-mib 12090
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig  # noqa: E402

from lit_ft.models import LoraSpec, ModelSpec  # noqa: E402
from lit_ft.plan import Settings, estimate_settings  # noqa: E402
from lit_ft.plan.auto import choose, step_seconds  # noqa: E402
from lit_ft.plan.rows import RowStats  # noqa: E402
from lit_ft.stages.dpo import DPOSpec  # noqa: E402
from lit_ft.train.optim import OptimSpec  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-mib", type=int, default=12090)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--response", type=int, default=1024)
    args = p.parse_args(argv)
    cfg = Path(tempfile.mkdtemp()) / "d1"
    LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                torch_dtype="bfloat16").save_pretrained(cfg)
    side = args.prompt + args.response
    data = RowStats(side, None, (args.response,) * 64, (side,) * 64, padded=False,
                    units=(args.prompt + 2 * args.response,) * 32, kind="pair side", train_count=1688)
    for auto_share in (False, True):
        s = Settings(stage="dpo", base=ModelSpec(name_or_path=str(cfg), dtype="bfloat16", attn_implementation="sdpa"),
                     lora=LoraSpec(r=16, alpha=32, dropout=0.05), optim=OptimSpec(lr=5e-5), dpo=DPOSpec(),
                     max_length=side, batch_size=8, target="cuda", data=data, precision="bf16-true",
                     compile_auto=True, share_prompt_auto=auto_share, steps=211)
        chosen, whats, _ = choose(s, args.budget_mib * 2**20)
        total = estimate_settings(chosen, budget=None, advise=False).total
        print(f"share_prompt {'auto' if auto_share else 'off '}: {', '.join(whats) or 'as configured'}; "
              f"modelled step {step_seconds(chosen):.3f} s, planned {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
