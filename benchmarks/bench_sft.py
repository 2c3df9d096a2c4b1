"""SFT throughput and memory: lit_ft (SFTModule + Lightning Trainer) against a plain HF+PEFT loop and TRL.

One script, the workload chosen by flag. The driver builds a randomly initialised Llama-shaped model once (speed
does not depend on the weights), saves it to --model-dir, then runs every variant in its own process (clean peak
memory, no patched modules or compile caches shared between variants), prints a table and writes JSON.

    python benchmarks/bench_sft.py --workload w1 --variants hf,trl,lit,lit+compile --json $OUT/w1.json
    python benchmarks/bench_sft.py --workload w1 --tiny --variants hf,trl,lit --json /tmp/w1.json   # CPU dry run
    python benchmarks/bench_sft.py --workload w2 --variants trl,trl+pack,lit,lit+nopack --json $OUT/w2.json

Variants: `hf` (plain loop: model(input_ids, labels) + torch AdamW; W3 adds peft.prepare_model_for_kbit_training),
`trl` (trl.SFTTrainer with its defaults: gradient checkpointing on, bf16 autocast), and `lit` with modifiers joined
by '+': `mixed` (precision bf16-mixed instead of bf16-true), `compile` (SFTModule(compile=True)), `liger`
(ModelSpec(liger_kernel=True)), `graphs` / `nographs` (SFTModule(cuda_graphs=True / False): each step's forward and
backward replayed from a CUDA graph; a `mem*` variant leaves it to the plan), `gc` / `nogc` (gradient checkpointing on / off, default: the workload's), `off`
(ModelSpec(activation_offloading=True): saved activations in pinned CPU memory); `prof` (any variant, every
script): torch.profiler over the first timed steps, the `profile` entry of the result (`Clock.profile_stats`);
`sync` (any variant, CUDA): the Python stacks of the first timed step's host-device synchronisations.

W2 trains on real variable-length data (GSM8K, chat-formatted, loss on the assistant turn only) and counts REAL
(non-pad) tokens: `trl` pads, `trl+pack` is TRL's padding-free BFD packing, `trl+pf` TRL's padding-free flattening
without packing, `lit` is SFTModule with PackedSFTCollator (InstructionDataModule(packing=True)), `lit+nopack` pads;
`mb<N>` sets the micro-batch (sequences, or packed rows for `trl+pack`), `nogc` also applies to TRL.
`hf` (real data): the floor, a plain loop over the same padded micro-batches (`run_hf_data`).
G135 is the same on the SmolLM2-135M shape at TRL's SFT settings (16 padded sequences a step, max length 1024).
`mem<MiB>` (lit, real data): `lit_ft.fit_memory` plans the fit for that budget before it starts and sets what it
chooses (micro-batch and accumulation, checkpointing, offloading, the loss chunk) — what `lit-ft fit --memory` does;
`memauto` plans for the card's free memory, as the default `--memory auto` does (random-data workloads too).
`ro` (lit): each decoder layer compiled with `mode="reduce-overhead"` (CUDA graphs; an experiment, not a module
setting); `b<N>` (lit, real data): padded lengths rounded up to a multiple of N (`pad_to_multiple_of`: fewer shapes).
`cap<GB>` (any variant): `torch.cuda.set_per_process_memory_fraction` to that many GB before anything runs, which
`--memory auto` plans for.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _driver  # noqa: E402
from _driver import versions  # noqa: E402,F401  (the other benchmarks import it from here)

PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this H200 (8192^3, random data)


@dataclass
class Workload(_driver.Shape):
    seq: int
    batch: int
    quant: str = "none"  # none | nf4
    gc: bool = False
    lr: float = 2e-4
    repeat_batch: bool = False  # same batch every step (the smoke test: the loss must fall)
    lora: dict = field(default_factory=lambda: dict(r=16, alpha=32, dropout=0.05))
    # Real data (data="gsm8k"): `seq` is the packed row length (and the longest sequence), `batch` the padded
    # micro-batch in sequences, `seqs_per_step` the sequences of one optimizer step (gradient accumulation makes up
    # the rest for smaller micro-batches).
    data: str = "random"  # random | gsm8k
    seqs_per_step: int = 0


WORKLOADS = {
    # Llama-3.2-1B shape, LoRA SFT, bf16 weights
    "w1": Workload("w1", 2048, 16, 32, 8, 8192, 128256, True, 2048, 8),
    # Llama-3.1-8B shape, QLoRA (NF4 + double quant), gradient checkpointing
    "w3": Workload("w3", 4096, 32, 32, 8, 14336, 128256, False, 2048, 4, quant="nf4", gc=True),
    # the same shape in bf16, no checkpointing (the 24 GB proof: it needs `--memory` to fit)
    "w8": Workload("w8", 4096, 32, 32, 8, 14336, 128256, False, 2048, 4),
    # small Llama, QLoRA through the Trainer with paged AdamW: GPU correctness of the QLoRA path
    "qlora_smoke": Workload("qlora_smoke", 512, 4, 8, 4, 1536, 32000, False, 256, 8, quant="nf4", gc=True,
                            lr=1e-3, repeat_batch=True),
    # Llama-3.2-1B shape, LoRA SFT on GSM8K (chat-formatted, ~217 tokens a sequence): 64 sequences a step
    # (~13.9k real tokens), padded micro-batches of 8, packed rows of 2048
    "w2": Workload("w2", 2048, 16, 32, 8, 8192, 128256, True, 2048, 8, data="gsm8k", seqs_per_step=64),
    # SmolLM2-135M shape, LoRA SFT on GSM8K at TRL's SFT settings: 16 padded sequences a step, max length 1024
    "g135": Workload("g135", 576, 30, 9, 3, 1536, 49152, True, 1024, 16, data="gsm8k", seqs_per_step=16),
}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=64, batch=2)
# Real data keeps the tokenizer's ids (< 49152, SmolLM2), so the tiny model keeps that vocabulary
TINY_DATA = dict(TINY, vocab=49152, seq=1024, batch=2, seqs_per_step=4)


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


def flops_per_real_token(w: Workload, timed: dict) -> dict:
    """As flops_per_token, per REAL token of variable-length sequences: a sequence of length l costs the matmuls
    per token and 12*L*l*d of attention per token, so the attention term averages to 12*L*d*sum(l^2)/sum(l).
    Padding, and attention across the sequences of a packed row (masked out), are not useful work and not counted."""
    fl = flops_per_token(w)
    attn = 12 * w.layers * w.hidden * timed["sum_len_sq"] / timed["real_tokens"]
    return dict(fl, attention=attn, total=fl["total"] - fl["attention"] + attn)


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
    """Wall time of steps warmup..end, synchronised at both ends only (steps overlap as they would in training).
    `profile` (the `prof` modifier of every script): torch.profiler over the timed steps, summarised by
    `profile_stats` (kernels a step, the GPU's busy share of the wall, CPU time in top-level operators, the
    costliest kernels) over the first PROFILED_STEPS timed steps; the profiler's own overhead slows the timed
    steps, so speed figures come from runs without it. `syncs` (the `sync` modifier): where the first timed step
    makes the host wait for the GPU."""

    PROFILED_STEPS = 3  # the profiler's event list grows by ~10^5 events a step: a few steps tell the split

    def __init__(self, warmup: int, device: str, profile: bool = False, syncs: bool = False):
        self.warmup, self.device, self.t0, self.t1, self.losses = warmup, device, None, None, []
        self.profile, self.prof, self.prof_t1 = profile, None, None
        self.syncs, self.sync_sites = syncs and device == "cuda", None

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step_start(self, step: int):
        if step == self.warmup and self.t0 is None:  # (the first micro-batch of the step under accumulation)
            self.sync()
            self.t0 = time.perf_counter()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if self.profile:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
                self.prof = profile(activities=acts)
                self.prof.__enter__()
            if self.syncs:
                self._watch_syncs()

    def step_end(self, step: int, loss=None):
        if loss is not None:
            self.losses.append(loss)
        self.sync()
        self.t1 = time.perf_counter()
        if self.sync_sites is not None and step == self.warmup:
            torch.cuda.set_sync_debug_mode(0)
        if self.prof is not None and self.prof_t1 is None and step >= self.warmup + self.PROFILED_STEPS - 1:
            self.prof_t1, self.prof_steps = self.t1, step - self.warmup + 1
            self.prof.__exit__(None, None, None)

    def _watch_syncs(self):
        """`sync` (any variant): every operation of the first timed step that makes the host wait for the GPU
        (`torch.cuda.set_sync_debug_mode`), counted by the innermost frames of its Python stack."""
        import collections
        import traceback
        import warnings

        self.sync_sites = collections.Counter()
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename][-4:]
            self.sync_sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames))] += 1

        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def profile_stats(self, steps: int) -> dict:
        """Where the timed steps' wall time went (empty without `profile`): CUDA kernels a step and their summed
        device time, that time's share of the wall (the rest: launches, host work, synchronisation), the CPU time
        of top-level operators (aten dispatch; the rest of the host time is Python and framework), and the eight
        kernels with the most device time."""
        out = {"sync_sites": dict(self.sync_sites.most_common(12))} if self.sync_sites is not None else {}
        if self.prof is None:
            return out
        if self.prof_t1 is None:  # fewer timed steps than PROFILED_STEPS
            self.prof_t1, self.prof_steps = self.t1, steps
            self.prof.__exit__(None, None, None)
        steps = self.prof_steps
        events = self.prof.events()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        top_cpu = [e for e in events if e.device_type.name == "CPU" and e.cpu_parent is None]
        busy_us = sum(e.device_time for e in kernels)
        wall_ms = (self.prof_t1 - self.t0) * 1e3
        by_name: dict[str, list] = {}
        for e in kernels:
            by_name.setdefault(e.name[:90], []).append(e.device_time)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
        return {**out, "profile": {
            "profiled_steps": steps, "kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": busy_us / 1e3 / steps,
            "wall_ms_per_step": wall_ms / steps, "gpu_busy_share": busy_us / 1e3 / wall_ms if wall_ms else 0.0,
            "top_level_cpu_op_ms_per_step": sum(e.cpu_time_total for e in top_cpu) / 1e3 / steps,
            "top_kernels": [{"name": n, "calls_per_step": len(t) / steps, "ms_per_step": sum(t) / 1e3 / steps}
                            for n, t in top]}}

    def trainer_callback(self):
        """A transformers `TrainerCallback` timing the optimizer steps of TRL's trainers on this clock."""
        from transformers import TrainerCallback

        clock = self

        class TimerCb(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                clock.step_start(state.global_step)

            def on_step_end(self, a, state, control, **kw):
                clock.step_end(state.global_step - 1)

        return TimerCb()

    def lightning_callback(self):
        """A Lightning `Callback` timing the optimizer steps (one batch each) on this clock, with each step's loss."""
        import lightning as L

        clock = self

        class TimerCb(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.step_start(trainer.global_step)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                # Lightning hands the loss back divided by the accumulation
                clock.step_end(trainer.global_step - 1, outputs["loss"].detach() * trainer.accumulate_grad_batches)

        return TimerCb()


# ---------------------------------------------------------------------------------------------- real data (W2)


def save_data_tokenizer(args) -> None:
    """The data's tokenizer (SmolLM2's, in --data-dir/tokenizer) saved next to the random model, where both TRL and
    lit_ft load it from (lit_ft resolves a tokenizer by model name and wants a model directory)."""
    if not (Path(args.model_dir) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(Path(args.data_dir) / "tokenizer")).save_pretrained(args.model_dir)


def data_subset(w: Workload, args) -> Path:
    """GSM8K train in a seeded random order, cut to what the run needs (warmup + steps + 2 steps of margin), as
    question/answer jsonl: every variant reads the same rows in the same order (the padded and lit variants consume
    exactly the same sequences in every step; TRL's packing re-orders them into its best-fit-decreasing rows)."""
    lines = [x for x in (Path(args.data_dir) / "train.jsonl").read_text().splitlines() if x.strip()]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(0)).tolist()
    n = min(len(lines), (args.warmup + args.steps + 2) * w.seqs_per_step)
    out = Path(f"/tmp/lit_ft_bench_{w.name}_gsm8k_{n}.jsonl")
    rows = [json.loads(lines[i]) for i in order[:n]]
    out.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    return out


def gsm8k_data(w: Workload, args, batch_size: int, packing: bool, pad_to_multiple_of: int | None = None):
    """lit_ft's InstructionDataModule over the shared subset: chat template, loss on the answer only."""
    from lit_ft.data.modules import InstructionDataModule

    return InstructionDataModule(train_file=str(data_subset(w, args)), val_split=0.0, format="question_answer",
                                 template="chat", tokenizer=args.model_dir, max_length=w.seq, completion_only=True,
                                 dedup=False, packing=packing, batch_size=batch_size,
                                 pad_to_multiple_of=pad_to_multiple_of)


def modifier(mods: set[str], prefix: str) -> int | None:
    """The N of a modifier like mb8 (None when absent)."""
    return next((int(m[len(prefix):]) for m in mods if m.startswith(prefix) and m[len(prefix):].isdigit()), None)


class TokenCount:
    """Wraps a collator and records, for every micro-batch in the order they are built (the order they are trained
    in, whatever the loader prefetches), the real (non-pad) tokens, the token slots the model computes over
    (rows x padded length), the loss tokens (labels that are predicted: not -100, not position 0), the sequences
    and the sum of their squared lengths (attention FLOPs). A TRL packed row lists its sequences in seq_lengths."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, rows):
        out = self.collate(rows)
        lens = [n for r in rows for n in (r["seq_lengths"] if "seq_lengths" in r else [len(r["input_ids"])])]
        self.batches.append(dict(sequences=len(lens), real_tokens=sum(lens), sum_len_sq=sum(n * n for n in lens),
                                 slot_tokens=out["input_ids"].numel(),
                                 loss_tokens=int((out["labels"][:, 1:] != -100).sum())))
        return out

    def window(self, start: int, stop: int) -> dict:
        part = self.batches[start:stop]
        if len(part) != stop - start:
            raise RuntimeError(f"{len(self.batches)} micro-batches were built, the timed window is {start}..{stop}")
        return {k: sum(b[k] for b in part) for k in part[0]}


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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = make_batches(w, args.warmup + args.steps).reshape(-1, w.seq)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})

    cfg = trl.SFTConfig(
        output_dir="/tmp/trl_bench", per_device_train_batch_size=w.batch, max_steps=args.warmup + args.steps,
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
        report_to="none", max_length=w.seq, bf16=device == "cuda", use_cpu=device != "cuda",
        dataloader_num_workers=0, seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=make_tokenizer(),
                             peft_config=lora_config(w), callbacks=[clock.trainer_callback()])
    out = trainer.train()
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "trl": trl.__version__,
            "train_loss": out.training_loss}


def lit_module(w: Workload, args, device: str, mods: set[str]):
    """(SFTModule, precision, extra) for a lit variant's modifiers."""
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.train.optim import OptimSpec
    from lit_ft.stages.sft import SFTModule

    gc = (w.gc or "gc" in mods) and "nogc" not in mods
    base = ModelSpec(name_or_path=args.model_dir, dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", quantization=w.quant, double_quant=True, compute_dtype="bfloat16",
                     gradient_checkpointing=gc, liger_kernel="liger" in mods, activation_offloading="off" in mods)
    chunk = next((int(m[1:]) for m in mods if m[:1] == "c" and m[1:].isdigit()), 4096)  # e.g. lit+c1024
    optimizer = "paged_adamw_32bit" if w.name == "qlora_smoke" and device == "cuda" else "adamw"
    module = SFTModule(base=base, lora=LoraSpec(**w.lora),
                       optim=OptimSpec(optimizer=optimizer, lr=w.lr, warmup_steps=0, scheduler="constant"),
                       compile=compile_setting(mods), loss_chunk_size=chunk, cuda_graphs=graphs_setting(mods))
    if "ro" in mods:  # each decoder layer compiled with CUDA graphs (an experiment: not a module setting)
        from lit_ft.models import compile_decoder_layers

        configure = module.configure_model

        def configure_model():
            configure()
            compile_decoder_layers(module.model, mode="reduce-overhead")

        module.configure_model = configure_model
    precision = "bf16-mixed" if "mixed" in mods or w.quant != "none" and "true" not in mods else "bf16-true"
    if device != "cuda":
        precision = "32-true"
    extra = {"precision": precision, "gradient_checkpointing": gc, "optimizer": optimizer, "loss_chunk_size": chunk}
    return module, precision, extra


def lit_trainer(device: str, precision: str, max_steps: int, callback, accumulate: int = 1):
    import lightning as L

    return L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                     max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback], deterministic=False,
                     accumulate_grad_batches=accumulate)


def lit_after_fit(module, mods: set[str], device: str, batch: dict, extra: dict) -> dict:
    graphs = getattr(module, "_graphs", None)
    if graphs is not None:
        extra.update(cuda_graphs=len(graphs.graphs), graph_replays=graphs.replays, graph_failed=graphs.failed)
    if "compile" in mods:
        from torch._dynamo.utils import counters

        extra["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    if "profile" in mods and device == "cuda":
        extra["attention_kernels"] = attention_kernels(module, batch, device)
    return extra


def compile_setting(mods: set[str]) -> bool | None:
    """The module's `compile`: on with `compile`; left to the plan (None, the stages' default) in a `mem*` variant;
    else off."""
    return True if "compile" in mods else None if any(m.startswith("mem") for m in mods) else False


def graphs_setting(mods: set[str]) -> bool | None:
    """The module's `cuda_graphs`: on with `graphs`, off with `nographs`; left to the plan in a `mem*` variant; else
    off."""
    if "graphs" in mods or "nographs" in mods:
        return "graphs" in mods
    return None if any(m.startswith("mem") for m in mods) else False


def plan_memory(module, data, trainer, mods: set[str], extra: dict, run_steps: int | None = None) -> None:
    """`mem<MiB>` / `memauto`: what `lit-ft fit --memory` does before the fit loads any weights, with the settings
    it chose and the plan's peak (to compare with the measured one) in `extra`. `run_steps`: plan for a run of that
    many optimizer steps (what decides whether compiling pays), though only the benchmark's steps run."""
    budget = next((m[3:] for m in mods if m.startswith("mem")), None)
    if not budget:
        return
    from lit_ft import fit_memory
    from lit_ft.plan import estimate

    said, steps = [], trainer.fit_loop.epoch_loop.max_steps
    trainer.fit_loop.epoch_loop.max_steps = run_steps or steps
    try:
        fit_memory(module, data, trainer, budget if budget == "auto" else f"{budget}MiB", say=said.append)
    finally:
        trainer.fit_loop.epoch_loop.max_steps = steps
    plan = estimate(module, data, trainer, budget=None, advise=False)
    extra.update(memory_plan=said, planned_peak_gb=plan.peak / 1e9, planned_total_gb=plan.total / 1e9,
                 compiled=bool(getattr(module, "compile_layers", False)), run_steps_planned=run_steps or steps,
                 gradient_checkpointing=module.base.gradient_checkpointing,
                 activation_offloading=module.base.activation_offloading,
                 checkpoint_every=module.base.checkpoint_every, loss_chunk_size=getattr(module, "loss_chunk_size", None),
                 micro_batch=data.batch_size, grad_accum=trainer.accumulate_grad_batches)


def run_lit(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    import types

    module, precision, extra = lit_module(w, args, device, mods)
    ids = make_batches(w, args.warmup + args.steps)
    trainer = lit_trainer(device, precision, args.warmup + args.steps, clock.lightning_callback())
    shape = types.SimpleNamespace(batch_size=w.batch, max_length=w.seq)  # what the plan reads of a DataModule
    plan_memory(module, shape, trainer, mods, extra, args.run_steps)
    if shape.batch_size != w.batch:  # the same rows, in micro-batches of the chosen size
        ids = ids.reshape(-1, shape.batch_size, w.seq)
    loader = torch.utils.data.DataLoader(Batches(ids), batch_size=None, shuffle=False, pin_memory=device == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    x = ids[0]
    return lit_after_fit(module, mods, device, {"input_ids": x, "attention_mask": torch.ones_like(x),
                                                "labels": x.clone()}, extra)


def run_lit_data(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    """SFTModule on GSM8K: InstructionDataModule (chat template, completion-only labels) tokenizes; its collator
    (PackedSFTCollator with `packing`, the default; SFTCollator with `nopack`) builds micro-batches of `mb`
    sequences in the order of the shared subset; Lightning accumulates gradients over the rest of the step."""
    import lightning as L

    module, precision, extra = lit_module(w, args, device, mods)
    pack = "nopack" not in mods
    mb = modifier(mods, "mb") or (w.seqs_per_step if pack else w.batch)
    if w.seqs_per_step % mb:
        raise ValueError(f"micro-batch {mb} does not divide {w.seqs_per_step} sequences a step")
    ga = w.seqs_per_step // mb
    dm = gsm8k_data(w, args, mb, pack, modifier(mods, "b"))
    acc = {"ga": ga}

    class TimerCb(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % acc["ga"] == 0:
                clock.step_start(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            micro_losses.append(outputs["loss"].detach() * acc["ga"])  # Lightning hands it back divided by it
            if (batch_idx + 1) % acc["ga"] == 0:
                clock.step_end(trainer.global_step - 1)

    trainer = lit_trainer(device, precision, args.warmup + args.steps, TimerCb(), ga)
    plan_memory(module, dm, trainer, mods, extra, args.run_steps)
    mb, ga = dm.batch_size, trainer.accumulate_grad_batches
    acc["ga"] = ga
    dm.setup("fit")
    counter = TokenCount(dm.collator())
    micro_losses = []
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=mb, shuffle=False, collate_fn=counter,
                                         pin_memory=device == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    # Each step's loss is the token-weighted mean over its micro-batches (what TRL logs), for the cross-checks
    losses = [float(x) for x in micro_losses]
    for s in range(len(losses) // ga):
        part = range(s * ga, (s + 1) * ga)
        n = sum(counter.batches[i]["loss_tokens"] for i in part)
        clock.losses.append(sum(losses[i] * counter.batches[i]["loss_tokens"] for i in part) / max(n, 1))
    extra.update(packing=pack, micro_batch=mb, grad_accum=ga,
                 timed=counter.window(args.warmup * ga, (args.warmup + args.steps) * ga))
    return lit_after_fit(module, mods, device, dm.collator()([dm.train_dataset[i] for i in range(mb)]), extra)


def run_hf_data(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    """The floor without a framework: the same padded micro-batches as `lit+nopack` (lit_ft's collator over the
    same rows), a plain loop of transformers' forward with `labels` (its own loss over full logits) + backward +
    torch AdamW (fused on CUDA, as lit_ft now steps) over a PEFT LoRA; `gc`: transformers' non-reentrant gradient
    checkpointing; bf16 weights on CUDA. No guards, no logging, no Lightning: what the step costs by itself."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    mb = modifier(mods, "mb") or w.batch
    ga = w.seqs_per_step // mb
    dm = gsm8k_data(w, args, mb, packing=False)
    dm.setup("fit")
    counter = TokenCount(dm.collator())
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=mb, shuffle=False, collate_fn=counter,
                                         pin_memory=device == "cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device)
    gc = "gc" in mods
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(w))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=w.lr, **({"fused": True} if device == "cuda" else {}))
    it = iter(loader)
    for step in range(args.warmup + args.steps):
        clock.step_start(step)
        total = torch.zeros((), device=device)
        for _ in range(ga):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
            loss = model(**batch).loss / ga
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.step_end(step, total)
    return {"precision": "bf16-true" if device == "cuda" else "32-true", "gradient_checkpointing": gc,
            "micro_batch": mb, "grad_accum": ga,
            "timed": counter.window(args.warmup * ga, (args.warmup + args.steps) * ga)}


def run_trl_data(w: Workload, args, device: str, clock: Clock, mods: set[str]) -> dict:
    """trl.SFTTrainer on GSM8K as conversational prompt/completion rows (user question, assistant answer), so that
    its completion-only loss covers exactly the assistant turn, like lit_ft's chat template segments.

    `trl`: padded micro-batches of `mb` sequences, the same sequences per step as lit. `trl+pf`: the same
    micro-batches flattened padding-free (SFTConfig(padding_free=True), max_length=None, as TRL requires without
    packing). `trl+pack`: SFTConfig(packing=True, packing_strategy="bfd"), which turns padding_free on: rows of up
    to `seq` tokens packed best-fit-decreasing over the subset, k rows a step with k = round(sequences a step x mean
    length / seq), `mb` rows a micro-batch (default k), flattened into one row. TRL's defaults otherwise (gradient
    checkpointing unless `nogc`, bf16 autocast, its fused LM-head loss, gradient clipping 1.0).
    """
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(x) for x in data_subset(w, args).read_text().splitlines()]
    convs = [{"prompt": [{"role": "user", "content": r["question"]}],
              "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows]
    pack, pf = "pack" in mods, "pf" in mods
    per_step = w.seqs_per_step
    if pack:
        lens = [len(tok(tok.apply_chat_template(c["prompt"] + c["completion"], tokenize=False),
                        add_special_tokens=False)["input_ids"]) for c in convs]
        per_step = max(1, round(w.seqs_per_step * sum(lens) / len(lens) / w.seq))
    mb = modifier(mods, "mb") or (per_step if pack else w.batch)
    if per_step % mb:
        raise ValueError(f"micro-batch {mb} does not divide {per_step} {'rows' if pack else 'sequences'} a step")
    ga = per_step // mb
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    ds = datasets.Dataset.from_list(convs)
    gc = {"gradient_checkpointing": False} if "nogc" in mods else {}
    cfg = trl.SFTConfig(
        output_dir="/tmp/trl_bench", per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
        max_steps=args.warmup + args.steps, learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", max_length=None if pf and not pack else w.seq,
        packing=pack, packing_strategy="bfd", padding_free=pf or pack, completion_only_loss=True,
        bf16=device == "cuda", use_cpu=device != "cuda", dataloader_num_workers=0, seed=0, **gc,
    )

    class Trainer(trl.SFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            # the subset is already in a random order: read it in order, as lit does (packed rows: TRL's sampler)
            return super()._get_train_sampler(*a, **kw) if pack else torch.utils.data.SequentialSampler(
                self.train_dataset)

    logged = []

    class TimerCb(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.step_start(state.global_step)

        def on_step_end(self, a, state, control, **kw):
            clock.step_end(state.global_step - 1)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logged.append(float(logs["loss"]))

    trainer = Trainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora_config(w),
                      callbacks=[TimerCb()])
    counter = trainer.data_collator = TokenCount(trainer.data_collator)
    out = trainer.train()
    clock.losses = logged
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "trl": trl.__version__,
            "train_loss": out.training_loss, "packing": pack, "padding_free": trainer.padding_free,
            "micro_batch": mb, "grad_accum": ga, "rows_in_dataset": len(trainer.train_dataset),
            "timed": counter.window(args.warmup * ga, (args.warmup + args.steps) * ga)}


def attention_kernels(module, batch: dict, device: str) -> list[str]:
    """Names of the CUDA kernels of one training step that do attention (shows which SDPA backend ran)."""
    from torch.profiler import ProfilerActivity, profile

    module.to(device)  # Lightning moved it back to the CPU at the end of fit
    batch = {k: v.to(device) for k, v in batch.items()}
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
    t = time.time()
    device, impl, mods = _driver.start_variant(args.variant)
    clock = Clock(args.warmup, device, profile="prof" in mods, syncs="sync" in mods)
    if w.data == "random":
        runner = {"hf": run_hf, "trl": run_trl, "lit": lambda *a: run_lit(*a, set(mods))}[impl]
    else:
        save_data_tokenizer(args)  # (the driver did it already; for a --variant run on its own)
        runner = {"trl": lambda *a: run_trl_data(*a, set(mods)), "lit": lambda *a: run_lit_data(*a, set(mods)),
                  "hf": lambda *a: run_hf_data(*a, set(mods))}[impl]
    extra = runner(w, args, device, clock)
    elapsed = clock.t1 - clock.t0
    timed = extra.pop("timed", None)
    if timed is None:
        tokens = args.steps * w.batch * w.seq
        fl = flops_per_token(w)
        counts = dict(tokens_per_step=w.batch * w.seq)
    else:  # real data: real (non-pad) tokens only, FLOPs of the real sequences only
        tokens = timed["real_tokens"]
        fl = flops_per_real_token(w, timed)
        counts = dict(tokens_per_step=tokens / args.steps, fill=tokens / timed["slot_tokens"], timed=timed)
    tps = tokens / elapsed
    losses = [float(x) for x in clock.losses]
    res = dict(
        workload=w.name, variant=args.variant, steps=args.steps, warmup=args.warmup, **counts,
        seconds=elapsed, tokens_per_s=tps,
        **_driver.peak_memory(device),
        mfu=tps * fl["total"] / (PEAK_TFLOPS * 1e12), flops_per_token=fl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, losses=losses, wall_s=time.time() - t, **extra,
        **clock.profile_stats(args.steps),
    )
    return res


def workload(args) -> Workload:
    return _driver.pick(WORKLOADS, args, lambda w: TINY if w.data == "random" else TINY_DATA)


# ---------------------------------------------------------------------------------------------- driver


def drive(args) -> None:
    w = workload(args)
    build_random_model(w, _driver.default_model_dir(args, w), "cuda" if torch.cuda.is_available() else "cpu")
    if w.data != "random":
        save_data_tokenizer(args)
    flags = _driver.forward(args, "steps", "warmup", "run_steps", "data_dir", "tiny", "lora_dropout")
    print_table(w, _driver.run_variants(__file__, args, w, flags))


def print_table(w: Workload, results: list[dict]) -> None:
    ref = _driver.finished(results, "tokens_per_s")
    if w.data != "random":
        return print_data_table(w, results, ref)
    columns = [("tok/s", "9.0f", lambda r: r["tokens_per_s"]), ("peak GB", "8.1f", lambda r: r["peak_gb"]),
               ("MFU", "6.1%", lambda r: r["mfu"]), _driver.versus(ref, "hf", "tokens_per_s"),
               _driver.versus(ref, "trl", "tokens_per_s"), *_driver.loss_columns("7.3f")]
    _driver.print_table(f"{w.name}: seq {w.seq} x micro-batch {w.batch}, quant {w.quant}, LoRA {w.lora}; FLOPs/token "
                        f"{flops_per_token(w)['total'] / 1e9:.2f} G; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s", results,
                        "tokens_per_s", columns, width=28)


def print_data_table(w: Workload, results: list[dict], ref: dict) -> None:
    trl = [r for r in ref.values() if r["variant"].split("+")[0] == "trl"]
    best = max(trl, key=lambda r: r["tokens_per_s"]) if trl else None
    fl = next((r["flops_per_token"]["total"] for r in ref.values()), 0.0)
    columns = [("tok/s", "9.0f", lambda r: r["tokens_per_s"]), ("tok/step", "8.0f", lambda r: r["tokens_per_step"]),
               ("fill", "5.0%", lambda r: r["fill"]),
               ("mb x ga", ">8s", lambda r: f"{r.get('micro_batch')}x{r.get('grad_accum')}"),
               ("peak GB", "8.1f", lambda r: r["peak_gb"]), ("MFU", "6.1%", lambda r: r["mfu"]),
               _driver.versus(ref, "trl", "tokens_per_s"),
               ("vs best", ">7s", lambda r: f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}" if best else "-"),
               *_driver.loss_columns("7.3f")]
    _driver.print_table(f"{w.name}: {w.data}, {w.seqs_per_step} sequences a step, padded micro-batch {w.batch}, "
                        f"packed rows of {w.seq}, LoRA {w.lora}; tokens = REAL (non-pad) tokens; FLOPs/real token "
                        f"{fl / 1e9:.2f} G; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s; best TRL: "
                        f"{best['variant'] if best else '-'}", results, "tokens_per_s", columns, width=28)


def main(argv=None) -> None:
    p = _driver.parser(__doc__, WORKLOADS, "w1", "hf,trl,lit")
    _driver.add_steps(p)
    p.add_argument("--lora-dropout", type=float, default=None, help="override the workload's LoRA dropout (0.05)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--data-dir", default=str(ROOT / ".gsm8k"),
                   help="real-data workloads: train.jsonl (question/answer) and tokenizer/ (default ROOT/.gsm8k)")
    _driver.dispatch(_driver.parse(p, argv), run_variant, drive)


if __name__ == "__main__":
    main()
