"""SFT throughput and memory: lit_ft (SFTModule + Lightning Trainer) against a plain HF+PEFT loop and TRL.

One script, the workload chosen by flag. The driver builds a randomly initialised Llama-shaped model once (speed
does not depend on the weights), saves it to --model-dir, then runs every variant in its own process (clean peak
memory, no patched modules or compile caches shared between variants), prints a table and writes JSON.

    python benchmarks/bench_sft.py --workload w1 --variants hf,trl,lit,lit+compile --json $OUT/w1.json
    python benchmarks/bench_sft.py --workload w1 --tiny --variants hf,trl,lit --json /tmp/w1.json   # CPU dry run

Variants: `hf` (plain loop: model(input_ids, labels) + torch AdamW; W3 adds peft.prepare_model_for_kbit_training),
`trl` (trl.SFTTrainer with its defaults: gradient checkpointing on, bf16 autocast), and `lit` with modifiers joined
by '+': `mixed` (precision bf16-mixed instead of bf16-true), `compile` (SFTModule(compile=True)), `liger`
(ModelSpec(liger_kernel=True)), `gc` / `nogc` (gradient checkpointing on / off, default: the workload's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this H200 (8192^3, random data)


@dataclass
class Workload:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    seq: int
    batch: int
    quant: str = "none"  # none | nf4
    gc: bool = False
    lr: float = 2e-4
    repeat_batch: bool = False  # same batch every step (the smoke test: the loss must fall)
    lora: dict = field(default_factory=lambda: dict(r=16, alpha=32, dropout=0.05))


WORKLOADS = {
    # Llama-3.2-1B shape, LoRA SFT, bf16 weights
    "w1": Workload("w1", 2048, 16, 32, 8, 8192, 128256, True, 2048, 8),
    # Llama-3.1-8B shape, QLoRA (NF4 + double quant), gradient checkpointing
    "w3": Workload("w3", 4096, 32, 32, 8, 14336, 128256, False, 2048, 4, quant="nf4", gc=True),
    # small Llama, QLoRA through the Trainer with paged AdamW: GPU correctness of the QLoRA path
    "qlora_smoke": Workload("qlora_smoke", 512, 4, 8, 4, 1536, 32000, False, 256, 8, quant="nf4", gc=True,
                            lr=1e-3, repeat_batch=True),
}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=64, batch=2)


def flops_per_token(w: Workload) -> dict:
    """Model FLOPs per trained token (MFU, not HFU: recomputation under checkpointing is not counted).

    2N forward + 2N backward through frozen weights (input gradients only) over the matmul weights N (every
    projection of every layer plus the LM head), 6 per LoRA parameter (forward, input and weight gradients), and
    attention scores/values 12*L*T*d for forward+backward, counted without the causal halving (PaLM's convention).
    """
    d, i, L = w.hidden, w.intermediate, w.layers
    kv = d // w.heads * w.kv_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * i
    n = per_layer * L + w.vocab * d
    r = w.lora["r"]
    lora = L * r * ((d + d) * 2 + (d + kv) * 2 + (d + i) * 3)
    attn = 12 * L * w.seq * d
    return dict(n_matmul=n, n_lora=lora, attention=attn, total=4 * n + 6 * lora + attn)


# ---------------------------------------------------------------------------------------------- model and data


def build_random_model(w: Workload, path: Path, device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    cfg = LlamaConfig(
        hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
        intermediate_size=w.intermediate, vocab_size=w.vocab, tie_word_embeddings=w.tied,
        max_position_embeddings=max(4096, w.seq), rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    print(f"built and saved {path} in {time.time() - t:.0f}s", flush=True)


def make_tokenizer():
    """A stand-in tokenizer (TRL wants one for padding); the data is pre-tokenised random ids."""
    from tokenizers import Tokenizer, models as tk_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tk_models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_batches(w: Workload, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, w.vocab, (n if not w.repeat_batch else 1, w.batch, w.seq), generator=g)
    return ids.expand(n, -1, -1).contiguous() if w.repeat_batch else ids


class Batches(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}  # no padding


def lora_config(w: Workload):
    from peft import LoraConfig

    from lit_ft.models import ALL_PROJECTIONS

    return LoraConfig(r=w.lora["r"], lora_alpha=w.lora["alpha"], lora_dropout=w.lora["dropout"],
                      target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM")


class Clock:
    """Wall time of steps warmup..end, synchronised at both ends only (steps overlap as they would in training)."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.t0, self.t1, self.losses = warmup, device, None, None, []

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step_start(self, step: int):
        if step == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

    def step_end(self, step: int, loss=None):
        if loss is not None:
            self.losses.append(loss)
        self.sync()
        self.t1 = time.perf_counter()


# ---------------------------------------------------------------------------------------------- runners


def run_hf(w: Workload, args, device: str, clock: Clock) -> dict:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="sdpa")
    if w.quant != "none":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=w.quant,
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw).to(device)
    if w.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=w.gc)
    elif w.gc:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, lora_config(w))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.lr)
    ids = make_batches(w, args.warmup + args.steps)
    data = Batches(ids)
    for step in range(len(data)):
        b = {k: v.to(device, non_blocking=True) for k, v in data[step].items()}
        clock.step_start(step)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.step_end(step, loss.detach())
    return {}


def run_trl(w: Workload, args, device: str, clock: Clock) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = make_batches(w, args.warmup + args.steps).reshape(-1, w.seq)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})

    class TimerCb(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.step_start(state.global_step)

        def on_step_end(self, a, state, control, **kw):
            clock.step_end(state.global_step - 1)

    cfg = trl.SFTConfig(
        output_dir="/tmp/trl_bench", per_device_train_batch_size=w.batch, max_steps=args.warmup + args.steps,
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
        report_to="none", max_length=w.seq, bf16=device == "cuda", use_cpu=device != "cuda",
        dataloader_num_workers=0, seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=make_tokenizer(),
                             peft_config=lora_config(w), callbacks=[TimerCb()])
    out = trainer.train()
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "trl": trl.__version__,
            "train_loss": out.training_loss}


def run_lit(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    import lightning as L

    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.optim import OptimSpec
    from lit_ft.sft import SFTModule

    gc = (w.gc or "gc" in mods) and "nogc" not in mods
    base = ModelSpec(name_or_path=args.model_dir, dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", quantization=w.quant, double_quant=True, compute_dtype="bfloat16",
                     gradient_checkpointing=gc, liger_kernel="liger" in mods)
    chunk = next((int(m[1:]) for m in mods if m[:1] == "c" and m[1:].isdigit()), 4096)  # e.g. lit+c1024
    optimizer = "paged_adamw_32bit" if w.name == "qlora_smoke" and device == "cuda" else "adamw"
    module = SFTModule(base=base, lora=LoraSpec(**w.lora),
                       optim=OptimSpec(optimizer=optimizer, lr=w.lr, warmup_steps=0, scheduler="constant"),
                       compile="compile" in mods, loss_chunk_size=chunk)
    precision = "bf16-mixed" if "mixed" in mods or w.quant != "none" and "true" not in mods else "bf16-true"
    if device != "cuda":
        precision = "32-true"

    class TimerCb(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.step_start(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end(trainer.global_step - 1, outputs["loss"].detach())

    ids = make_batches(w, args.warmup + args.steps)
    loader = torch.utils.data.DataLoader(Batches(ids), batch_size=None, shuffle=False, pin_memory=device == "cuda")
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[TimerCb()], deterministic=False)
    trainer.fit(module, train_dataloaders=loader)
    extra = {"precision": precision, "gradient_checkpointing": gc, "optimizer": optimizer, "loss_chunk_size": chunk}
    if "compile" in mods:
        from torch._dynamo.utils import counters

        extra["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    if "profile" in mods and device == "cuda":
        extra["attention_kernels"] = attention_kernels(module, ids, device)
    return extra


def attention_kernels(module, ids: torch.Tensor, device: str) -> list[str]:
    """Names of the CUDA kernels of one training step that do attention (shows which SDPA backend ran)."""
    from torch.profiler import ProfilerActivity, profile

    module.to(device)  # Lightning moved it back to the CPU at the end of fit
    x = ids[0].to(device)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_sum, n = module.token_loss(batch)
        (loss_sum / n).backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    keys = ("flash", "fmha", "attention", "attn", "efficient", "sdpa", "softmax")
    return sorted(n[:120] for n in names if any(k in n.lower() for k in keys))


# ---------------------------------------------------------------------------------------------- one variant


def run_variant(args) -> dict:
    w = workload(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = Clock(args.warmup, device)
    impl, *mods = args.variant.split("+")
    t = time.time()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # what every runner gets by default
    runner = {"hf": run_hf, "trl": run_trl, "lit": lambda *a: run_lit(*a, set(mods))}[impl]
    extra = runner(w, args, device, clock)
    elapsed = clock.t1 - clock.t0
    tokens = args.steps * w.batch * w.seq
    tps = tokens / elapsed
    fl = flops_per_token(w)
    losses = [float(x) for x in clock.losses]
    res = dict(
        workload=w.name, variant=args.variant, steps=args.steps, warmup=args.warmup, tokens_per_step=w.batch * w.seq,
        seconds=elapsed, tokens_per_s=tps,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if device == "cuda" else 0.0,
        mfu=tps * fl["total"] / (PEAK_TFLOPS * 1e12), flops_per_token=fl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, losses=losses, wall_s=time.time() - t, **extra,
    )
    return res


def workload(args) -> Workload:
    w = WORKLOADS[args.workload]
    if args.tiny:
        w = Workload(**{**asdict(w), **TINY, "name": w.name})
    if args.lora_dropout is not None:
        w.lora = {**w.lora, "dropout": args.lora_dropout}
    return w


# ---------------------------------------------------------------------------------------------- driver


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("transformers", "peft", "lightning", "bitsandbytes", "trl", "liger-kernel", "datasets", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def drive(args) -> None:
    w = workload(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.model_dir = args.model_dir or f"/tmp/lit_ft_bench_{w.name}{'_tiny' if args.tiny else ''}"
    build_random_model(w, Path(args.model_dir), device)
    results = []
    for variant in args.variants.split(","):
        out = Path(args.json).with_suffix(f".{variant.replace('+', '_')}.part.json")
        cmd = [sys.executable, __file__, "--workload", args.workload, "--variant", variant, "--model-dir",
               args.model_dir, "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out)]
        if args.tiny:
            cmd.append("--tiny")
        if args.lora_dropout is not None:
            cmd += ["--lora-dropout", str(args.lora_dropout)]
        t = time.time()
        print(f"--- {w.name} {variant}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
        if proc.returncode == 0 and out.exists():
            res = json.loads(out.read_text())
            out.unlink()
        else:
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(tail, flush=True)
            res = dict(workload=w.name, variant=variant, error=tail[-800:], wall_s=time.time() - t)
        results.append(res)
        Path(args.json).write_text(json.dumps(dict(workload=asdict(w), versions=versions(), results=results),
                                              indent=1))
    print_table(w, results)


def print_table(w: Workload, results: list[dict]) -> None:
    ref = {r["variant"]: r for r in results if "tokens_per_s" in r}
    print(f"\n{w.name}: seq {w.seq} x micro-batch {w.batch}, quant {w.quant}, LoRA {w.lora}; "
          f"FLOPs/token {flops_per_token(w)['total'] / 1e9:.2f} G; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s")
    print(f"{'variant':28s} {'tok/s':>9s} {'peak GB':>8s} {'MFU':>6s} {'vs hf':>6s} {'vs trl':>6s} {'loss0':>7s} "
          f"{'lossN':>7s}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:28s} FAILED: {r['error'][-160:]!r}")
            continue
        vs = lambda k: f"{r['tokens_per_s'] / ref[k]['tokens_per_s']:.2f}" if k in ref else "-"  # noqa: E731
        print(f"{r['variant']:28s} {r['tokens_per_s']:9.0f} {r['peak_gb']:8.1f} {r['mfu']:6.1%} {vs('hf'):>6s} "
              f"{vs('trl'):>6s} {r['first_loss'] or 0:7.3f} {r['last_loss'] or 0:7.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="w1")
    p.add_argument("--variants", default="hf,trl,lit", help="comma-separated (driver mode)")
    p.add_argument("--variant", help="run this one variant in this process (used by the driver)")
    p.add_argument("--model-dir", help="where the random model is saved (default /tmp/lit_ft_bench_<workload>)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--lora-dropout", type=float, default=None, help="override the workload's LoRA dropout (0.05)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--variant-timeout", type=int, default=540)
    p.add_argument("--json", required=True, help="where to write the results")
    args = p.parse_args(argv)
    if args.variant:
        res = run_variant(args)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
