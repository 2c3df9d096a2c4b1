"""DPO throughput and memory: lit_ft (DPOModule + Lightning Trainer) against TRL's DPOTrainer.

Same method as `bench_sft.py` and `bench_reward.py` (whose helpers it reuses): a randomly initialised Llama-shaped
model is built once and saved to --model-dir, every variant runs in its own process, warm-up steps are untimed, the
timed steps are synchronised at both ends, peak = torch.cuda.max_memory_allocated over the timed steps.

    python benchmarks/bench_dpo.py --variants trl,trl+precompute,lit,lit+compile,lit+gc,lit+precompute --json $OUT/d1.json
    python benchmarks/bench_dpo.py --tiny --variants trl,lit,lit+precompute --steps 2 --warmup 1 --json /tmp/d1.json

Workload `d1`: Llama-3.2-1B shape, LoRA r16 alpha 32 on every projection, a new adapter whose reference is the
base with the adapter disabled (both frameworks), beta 0.1, sigmoid loss, dropout disabled (both defaults);
`pairs` preference pairs per step, each a `prompt` of random tokens shared by a `response`-token chosen and a
`response`-token rejected continuation (8 pairs x 1024 + 1024 tokens: 16 sequences of 2048 in one forward).

Variants: `trl` (trl.DPOTrainer with its defaults, bf16 autocast over bf16 weights; `+precompute`:
`precompute_ref_log_probs=True`; `+nogc`: gradient checkpointing off), and `lit` with modifiers joined by '+':
`compile` (DPOModule(compile=True)), `gc` (gradient checkpointing), `precompute` (DPOSpec(precompute_ref=True): the
reference pass runs once before the timed steps instead of every step, as TRL's precompute), `mixed` (bf16-mixed
instead of bf16-true), `mem<MiB>` / `memauto` (`lit_ft.fit_memory` plans the fit for that budget, or the card's free
memory, and sets what it chooses: `lit-ft fit --memory`), `share` / `noshare` (each pair one row, its prompt
once: `data.share_prompt`; neither: the plan's choice, off without `mem`). TRL is fed text in a word-level tokenizer (one word per random id), so it tokenizes the same
ids itself (and appends its EOS to each response); lit_ft reads the ids through its own PreferenceCollator.
Without trl installed the TRL variants are skipped with a message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _driver  # noqa: E402
from bench_sft import Clock, build_random_model, compile_setting, plan_memory  # noqa: E402  (also puts ROOT on sys.path)
from bench_reward import pair_columns  # noqa: E402

PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this H200


@dataclass
class Workload(_driver.Shape):
    prompt: int  # prompt tokens, shared by the chosen and the rejected sequence
    response: int  # tokens of each response
    pairs: int  # preference pairs per step (2 * pairs sequences per forward)
    lr: float = 5e-5
    lora: dict = field(default_factory=lambda: dict(r=16, alpha=32, dropout=0.05))

    @property
    def seq(self) -> int:  # what bench_sft.build_random_model sizes max_position_embeddings with
        return self.prompt + self.response


WORKLOADS = {"d1": Workload("d1", 2048, 16, 32, 8, 8192, 128256, True, 1024, 1024, 8)}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, prompt=24, response=24, pairs=2)


def flops_per_token(w: Workload, with_ref: bool) -> dict:
    """Model FLOPs per token of the 2 x pairs sequences: policy forward + backward through frozen weights (4N over
    the decoder matmuls), LoRA 6 per weight, attention 12*L*T*d; the LM head only over response positions; the
    reference forward (2N + its attention, 4*L*T*d) when it runs every step. MFU, not HFU (no recomputation)."""
    d, i, L = w.hidden, w.intermediate, w.layers
    kv = d // w.heads * w.kv_heads
    n = (d * d * 2 + d * kv * 2 + 3 * d * i) * L
    r = w.lora["r"]
    lora = L * r * ((d + d) * 2 + (d + kv) * 2 + (d + i) * 3)
    T = w.prompt + w.response
    head = w.vocab * d * w.response / T  # per token, averaged over the sequence
    policy = 4 * (n + head) + 6 * lora + 12 * L * T * d
    ref = 2 * (n + head + lora) + 4 * L * T * d if with_ref else 0
    return dict(n_matmul=n, n_lora=lora, policy=policy, reference=ref, total=policy + ref)


def make_pairs(w: Workload, n: int) -> list[dict]:
    """n pairs of random ids: a prompt, then a chosen and a rejected response (rows as lit_ft's tokenizer writes
    them: prompt_length and the source line, which key the precomputed reference)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        p, c, r = (torch.randint(4, w.vocab, (k,), generator=g).tolist() for k in (w.prompt, w.response, w.response))
        rows.append({"chosen_input_ids": p + c, "rejected_input_ids": p + r, "prompt_length": w.prompt,
                     "margin": None, "line": i + 1})
    return rows


def word_tokenizer(vocab: int):
    """Word-level tokenizer over `w<id>` words (id 0 pad, 1 bos, 2 eos, 3 unk), so text round-trips to the ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


# ---------------------------------------------------------------------------------------------- runners


def run_trl(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from lit_ft.models import ALL_PROJECTIONS

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if device == "cuda"
                                                 else torch.float32, attn_implementation="sdpa")
    text = lambda ids: " ".join(f"w{t}" for t in ids)  # noqa: E731
    rows = make_pairs(w, (args.warmup + args.steps) * w.pairs)
    ds = datasets.Dataset.from_list([{"prompt": text(r["chosen_input_ids"][: w.prompt]),
                                      "chosen": " " + text(r["chosen_input_ids"][w.prompt:]),
                                      "rejected": " " + text(r["rejected_input_ids"][w.prompt:])} for r in rows])
    peft_config = LoraConfig(r=w.lora["r"], lora_alpha=w.lora["alpha"], lora_dropout=w.lora["dropout"],
                             target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM")

    names = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    kw = dict(output_dir="/tmp/trl_dpo_bench", per_device_train_batch_size=w.pairs, max_steps=args.warmup + args.steps,
              learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
              report_to="none", max_length=w.prompt + w.response + 8, beta=0.1, bf16=device == "cuda",
              use_cpu=device != "cuda", dataloader_num_workers=0, seed=0,
              precompute_ref_log_probs="precompute" in mods, shuffle_dataset=False)
    kw.update(max_prompt_length=w.prompt + 4, max_completion_length=w.response + 4)  # never truncate
    if "nogc" in mods:
        kw["gradient_checkpointing"] = False
    cfg = trl.DPOConfig(**{k: v for k, v in kw.items() if k in names})
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=word_tokenizer(w.vocab),
                             peft_config=peft_config, callbacks=[clock.trainer_callback()])
    out = trainer.train()
    clock.losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][args.warmup:]
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "trl": trl.__version__,
            "train_loss": out.training_loss, "dropped_settings": sorted(set(kw) - names)}


def run_lit(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    import datasets
    import lightning as L

    from lit_ft.data.collate import PreferenceCollator, SharedPromptCollator
    from lit_ft.stages.dpo import DPOModule, DPOSpec
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.train.optim import OptimSpec

    gc = "gc" in mods
    base = ModelSpec(name_or_path=args.model_dir, dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", gradient_checkpointing=gc)
    L.seed_everything(0)  # the same LoRA initialisation in every variant (TRL seeds with its `seed`)
    module = DPOModule(base=base, lora=LoraSpec(**w.lora), dpo=DPOSpec(precompute_ref="precompute" in mods),
                       optim=OptimSpec(lr=w.lr, warmup_steps=0, scheduler="constant"), compile=compile_setting(mods))

    class Pairs(L.LightningDataModule):  # what the module reads of PreferenceDataModule, over the random pairs
        def __init__(self):
            super().__init__()
            self.train_dataset = datasets.Dataset.from_list(make_pairs(w, (args.warmup + args.steps) * w.pairs))
            self.val_dataset, self.tokenizer = None, None
            self.batch_size, self.max_length = w.pairs, w.seq  # what `fit_memory` reads (and may change)
            # `share` / `noshare`: each pair one row, its prompt once (`data.share_prompt`), or not; else the plan's
            self.share_prompt = True if "share" in mods else False if "noshare" in mods else None

        def collator(self):
            return SharedPromptCollator(0) if self.share_prompt else PreferenceCollator(0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=False,
                                               collate_fn=self.collator(), pin_memory=device == "cuda")

    precision = ("bf16-mixed" if "mixed" in mods else "bf16-true") if device == "cuda" else args.cpu_precision
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[clock.lightning_callback()])
    data, extra = Pairs(), {}
    plan_memory(module, data, trainer, mods, extra, args.run_steps)  # `mem<MiB>` / `memauto`
    gc = module.base.gradient_checkpointing
    t = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"precision": precision, "gradient_checkpointing": gc, "fit_s": time.perf_counter() - t,
            "precomputed": module.precomputed, "share_prompt": bool(data.share_prompt), **extra}


# ---------------------------------------------------------------------------------------------- one variant


def run_variant(args) -> dict:
    w = workload(args)
    t = time.time()
    device, impl, mods = _driver.start_variant(args.variant)
    clock = Clock(args.warmup, device, profile="prof" in mods, syncs="sync" in mods)
    extra = {"trl": run_trl, "lit": run_lit}[impl](w, args, device, clock, set(mods))
    elapsed = clock.t1 - clock.t0
    pairs_per_s = args.steps * w.pairs / elapsed
    tps = pairs_per_s * 2 * w.seq
    fl = flops_per_token(w, with_ref="precompute" not in mods)
    losses = [float(x) for x in clock.losses]
    return dict(
        workload=w.name, variant=args.variant, steps=args.steps, warmup=args.warmup, pairs_per_step=w.pairs,
        tokens_per_step=2 * w.pairs * w.seq, seconds=elapsed, pairs_per_s=pairs_per_s, tokens_per_s=tps,
        **_driver.peak_memory(device),
        mfu=tps * fl["total"] / (PEAK_TFLOPS * 1e12), flops_per_token=fl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, losses=losses, log2=math.log(2), wall_s=time.time() - t, **extra,
        **clock.profile_stats(args.steps),
    )


def workload(args) -> Workload:
    return _driver.pick(WORKLOADS, args, TINY)


# ---------------------------------------------------------------------------------------------- driver


def drive(args) -> None:
    w = workload(args)
    build_random_model(w, _driver.default_model_dir(args, w), "cuda" if torch.cuda.is_available() else "cpu")
    flags = _driver.forward(args, "steps", "warmup", "run_steps", "cpu_precision", "tiny")
    print_table(w, _driver.run_variants(__file__, args, w, flags, skip=trl_missing))


def trl_missing(variant: str) -> str | None:
    if variant.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    return None


def print_table(w: Workload, results: list[dict]) -> None:
    _driver.print_table(f"{w.name}: {w.pairs} pairs x ({w.prompt} prompt + {w.response} response) tokens per step, "
                        f"LoRA {w.lora}; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s (the reference forward counted where it "
                        "runs every step)", results, "pairs_per_s", pair_columns(results, "8.2f", "7.4f"))


def main(argv=None) -> None:
    p = _driver.parser(__doc__, WORKLOADS, "d1", "trl,lit")
    _driver.add_steps(p)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--cpu-precision", default="32-true", help="Lightning precision of `lit` on a CPU (dry runs)")
    _driver.dispatch(_driver.parse(p, argv), run_variant, drive)


if __name__ == "__main__":
    main()
