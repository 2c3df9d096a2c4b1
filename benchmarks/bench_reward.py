"""Reward-model throughput and memory: lit_ft (RewardModule + Lightning Trainer) against TRL's RewardTrainer.

Same method as `bench_sft.py` (whose helpers it reuses): a randomly initialised Llama-shaped model is built once and
saved to --model-dir, every variant runs in its own process, warm-up steps are untimed, the timed steps are
synchronised at both ends, peak = torch.cuda.max_memory_allocated over the timed steps.

    python benchmarks/bench_reward.py --variants trl,lit,lit+compile --json $OUT/w4.json
    python benchmarks/bench_reward.py --tiny --variants trl,lit --steps 2 --warmup 1 --json /tmp/w4.json  # CPU dry run

Every batch is `pairs` chosen rows followed by `pairs` rejected rows of exactly `seq` random tokens (no padding).
Variants: `trl` (trl.RewardTrainer with its defaults: gradient checkpointing on, bf16 autocast, dropout disabled),
and `lit` with modifiers joined by '+': `mixed` (precision bf16-mixed instead of bf16-true), `gc` (gradient
checkpointing), `liger` (ModelSpec(liger_kernel=True)), `compile` (RewardModule(compile=True): torch.compile of each
decoder layer; the W4 figures in BENCHMARKS.md were measured when the benchmark called
`lit_ft.models.compile_decoder_layers` itself after `configure_model`, which is what the switch does).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _driver  # noqa: E402
from bench_sft import Clock, build_random_model, make_tokenizer  # noqa: E402  (also puts ROOT on sys.path)

PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this H200


@dataclass
class Workload(_driver.Shape):
    seq: int  # tokens of every chosen and every rejected row
    pairs: int  # preference pairs per micro-batch (2 * pairs rows per forward)
    lr: float = 2e-4
    lora: dict = field(default_factory=lambda: dict(r=16, alpha=32, dropout=0.05))


WORKLOADS = {
    # Llama-3.2-1B shape, LoRA r16 on every projection, bf16 weights, 8 pairs of 1024-token rows
    "w4": Workload("w4", 2048, 16, 32, 8, 8192, 128256, True, 1024, 8),
}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=64, pairs=2)


def flops_per_token(w: Workload) -> dict:
    """Model FLOPs per trained token: 4N over the decoder's matmul weights (frozen: forward + input gradients),
    6 per LoRA weight, attention 12*L*T*d (no causal halving). No LM head: the score head reads one position per row."""
    d, i, L = w.hidden, w.intermediate, w.layers
    kv = d // w.heads * w.kv_heads
    n = (d * d * 2 + d * kv * 2 + 3 * d * i) * L
    r = w.lora["r"]
    lora = L * r * ((d + d) * 2 + (d + kv) * 2 + (d + i) * 3)
    attn = 12 * L * w.seq * d
    return dict(n_matmul=n, n_lora=lora, attention=attn, total=4 * n + 6 * lora + attn)


def make_pairs(w: Workload, n: int) -> torch.Tensor:
    """[n, 2 * pairs, seq] random token ids (rows 0..pairs-1 chosen, the rest rejected)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, w.vocab, (n, 2 * w.pairs, w.seq), generator=g)


class PairBatches(torch.utils.data.Dataset):
    """What lit_ft's preference collator yields: chosen-then-rejected rows, attention mask, margin."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "margin": torch.zeros(x.shape[0] // 2)}


# ---------------------------------------------------------------------------------------------- runners


def run_trl(w: Workload, args, device: str, clock: Clock) -> dict:
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    from lit_ft.models import ALL_PROJECTIONS

    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=1, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        attn_implementation="sdpa")
    ids = make_pairs(w, args.warmup + args.steps)  # TRL's collator puts chosen rows first, as ours does
    chosen, rejected = ids[:, : w.pairs].reshape(-1, w.seq), ids[:, w.pairs :].reshape(-1, w.seq)
    ds = datasets.Dataset.from_dict({"chosen_ids": chosen.tolist(), "rejected_ids": rejected.tolist()})
    peft_config = LoraConfig(r=w.lora["r"], lora_alpha=w.lora["alpha"], lora_dropout=w.lora["dropout"],
                             target_modules=list(ALL_PROJECTIONS), task_type="SEQ_CLS", modules_to_save=["score"])

    cfg = trl.RewardConfig(
        output_dir="/tmp/trl_rm_bench", per_device_train_batch_size=w.pairs, max_steps=args.warmup + args.steps,
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
        report_to="none", max_length=w.seq, bf16=device == "cuda", use_cpu=device != "cuda",
        dataloader_num_workers=0, seed=0,
    )
    trainer = trl.RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=make_tokenizer(),
                                peft_config=peft_config, callbacks=[clock.trainer_callback()])
    out = trainer.train()
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "disable_dropout": cfg.disable_dropout,
            "trl": trl.__version__, "train_loss": out.training_loss}


def run_lit(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    import lightning as L

    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.train.optim import OptimSpec
    from lit_ft.stages.reward import RewardModule

    gc = "gc" in mods
    base = ModelSpec(name_or_path=args.model_dir, dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", gradient_checkpointing=gc, liger_kernel="liger" in mods)

    module = RewardModule(base=base, lora=LoraSpec(**w.lora), optim=OptimSpec(lr=w.lr, warmup_steps=0, scheduler="constant"),
                          normalize_on_fit_end=False, compile="compile" in mods)
    precision = "bf16-mixed" if "mixed" in mods else "bf16-true"
    if device != "cuda":
        precision = args.cpu_precision

    loader = torch.utils.data.DataLoader(PairBatches(make_pairs(w, args.warmup + args.steps)), batch_size=None,
                                         shuffle=False, pin_memory=device == "cuda")
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock.lightning_callback()], deterministic=False)
    trainer.fit(module, train_dataloaders=loader)
    extra = {"precision": precision, "gradient_checkpointing": gc}
    if "compile" in mods:
        from torch._dynamo.utils import counters

        extra["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    return extra


# ---------------------------------------------------------------------------------------------- one variant


def run_variant(args) -> dict:
    w = workload(args)
    t = time.time()
    device, impl, mods = _driver.start_variant(args.variant)
    clock = Clock(args.warmup, device, profile="prof" in mods, syncs="sync" in mods)
    runner = {"trl": run_trl, "lit": lambda *a: run_lit(*a, set(mods))}[impl]
    extra = runner(w, args, device, clock)
    elapsed = clock.t1 - clock.t0
    pairs_per_s = args.steps * w.pairs / elapsed
    tps = pairs_per_s * 2 * w.seq
    fl = flops_per_token(w)
    losses = [float(x) for x in clock.losses]
    return dict(
        workload=w.name, variant=args.variant, steps=args.steps, warmup=args.warmup, pairs_per_step=w.pairs,
        tokens_per_step=2 * w.pairs * w.seq, seconds=elapsed, pairs_per_s=pairs_per_s, tokens_per_s=tps,
        **_driver.peak_memory(device),
        mfu=tps * fl["total"] / (PEAK_TFLOPS * 1e12), flops_per_token=fl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, losses=losses, wall_s=time.time() - t, **extra,
        **clock.profile_stats(args.steps),
    )


def workload(args) -> Workload:
    return _driver.pick(WORKLOADS, args, TINY)


# ---------------------------------------------------------------------------------------------- driver


def drive(args) -> None:
    w = workload(args)
    # the SFT benchmark's builder: same field names; `seq`/`batch` only size max_position_embeddings
    build_random_model(w, _driver.default_model_dir(args, w), "cuda" if torch.cuda.is_available() else "cpu")
    flags = _driver.forward(args, "steps", "warmup", "cpu_precision", "tiny", "lora_dropout")
    print_table(w, _driver.run_variants(__file__, args, w, flags))


def print_table(w: Workload, results: list[dict]) -> None:
    _driver.print_table(f"{w.name}: {w.pairs} pairs x 2 x {w.seq} tokens per step, LoRA {w.lora}; FLOPs/token "
                        f"{flops_per_token(w)['total'] / 1e9:.2f} G; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s", results,
                        "pairs_per_s", pair_columns(results, "8.1f", "7.3f"))


def pair_columns(results: list[dict], pairs: str, loss: str) -> list[_driver.Column]:
    """The table of a preference-pair benchmark (this one and bench_dpo.py), with the formats of pairs/s and losses."""
    return [("pairs/s", pairs, lambda r: r["pairs_per_s"]), ("tok/s", "9.0f", lambda r: r["tokens_per_s"]),
            ("peak GB", "8.1f", lambda r: r["peak_gb"]), ("MFU", "6.1%", lambda r: r["mfu"]),
            _driver.versus(_driver.finished(results, "pairs_per_s"), "trl", "pairs_per_s"),
            *_driver.loss_columns(loss)]


def main(argv=None) -> None:
    p = _driver.parser(__doc__, WORKLOADS, "w4", "trl,lit")
    _driver.add_steps(p)
    p.add_argument("--lora-dropout", type=float, default=None, help="override the workload's LoRA dropout (0.05)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--cpu-precision", default="32-true", help="Lightning precision of `lit` on a CPU (dry runs)")
    _driver.dispatch(_driver.parse(p, argv), run_variant, drive)


if __name__ == "__main__":
    main()
