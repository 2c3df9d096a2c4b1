"""One PPO iteration of lit_ft's PPOModule, timed phase by phase, with generation against the bandwidth bound.

Same method as `bench_sft.py` (whose helpers it reuses): a randomly initialised Llama-shaped model is built once and
saved to --model-dir (with a stand-in tokenizer), every variant runs in its own process, the first --warmup
iterations are untimed, peak = torch.cuda.max_memory_allocated over the timed iterations.

    python benchmarks/bench_ppo.py --workload w5 --variants lit --json $OUT/w5.json
    python benchmarks/bench_ppo.py --workload w5_8b --variants lit --iters 1 --warmup 0 --json $OUT/w5_8b.json
    python benchmarks/bench_ppo.py --workload w5 --variants lit,grpo,grpo+gc --json $OUT/w5_grpo.json
    python benchmarks/bench_ppo.py --workload w5 --tiny --variants lit,grpo --json /tmp/w5.json   # CPU dry run

The driver also writes the reward model: a fresh SEQ_CLS LoRA with its `score` head, made by `RewardModule` on the
same base and exported with `RewardModule.save_adapter` (the format `lit_ft.online.scoring` defines and PPO reads). PPO then
holds four roles on one base: a new LoRA policy, the base without adapters as the reference, the frozen reward
adapter + head, and a value adapter + head initialised from the reward model (`value_model="adapter"`).

The iteration runs through a Lightning Trainer (`PPOModule.training_step`); the phases are timed by wrapping the
module's own methods with synchronised timers: `rollout` (generation, HF `generate` with the KV cache),
`score` (reward adapter over prompt + response), `evaluate_rollout` (no-grad passes: policy log-probs + entropy,
reference log-probs, values), `ppo_update` (`ppo_epochs` x minibatch forward/backward/optimizer steps).
The gap between their sum and the whole `training_step` is the KL-shaped rewards, GAE, whitening and logging.

Variants: `lit` with modifiers joined by '+': `e<N>` (ppo_epochs=N, default 4), `gc` (gradient checkpointing),
`mb<N>` (mini_batch_size=N, default 8), `compile` (the decoder layers compiled in the update's gradient passes:
`compile: true`); the rollout decoder (`SamplingSpec.engine`, default `auto`: the static
engine of `lit_ft.online.engine` on CUDA): `hf` (transformers' `generate`), `static`, `merged` (static, policy LoRA merged
into a rollout copy), `nograph` (static without CUDA-graph capture), `dcompile` (the static engine's step compiled:
`SamplingSpec.compile`), `dequant` (a 4-bit base de-quantized once a rollout: `SamplingSpec.dequantize`).
`grpo` runs `GRPOModule` on the same shapes
(a new LoRA policy, the base as the reference, no value model, scored by the same reward adapter) with `k<N>`
samples a prompt (default 8: `prompts x N` rollout rows), `p<N>` prompts a rollout (default the workload's), `mb<N>`, `it<N>` (num_iterations, default 1) and the
engine and `gc` modifiers above; its phases map onto the same columns (`evaluate_rollout` = the no-grad old and
reference log-probs, `ppo_update` = `grpo_update`).
`memauto` (both): `lit_ft.fit_memory(..., "auto")` plans the fit before it loads any weights, as the default
`lit-ft fit --memory auto` does (with `cap<GB>`: for that share of the card), and sets what it chooses; the plan's
lines and its planned peak go into the result.

Bandwidth bound of decoding: every decode step streams the base weights once (the input embedding excluded: it is
a lookup; a tied LM head counted once), so tokens/s <= batch x HBM bandwidth / weight bytes. KV-cache reads, LoRA
weights and the prefill are not in the bound (they only lower the achievable share).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _driver  # noqa: E402
from bench_sft import build_random_model, make_tokenizer  # noqa: E402  (also puts ROOT on sys.path)

HBM = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12}  # nominal HBM bytes/s


def hbm_bytes_per_s() -> float:
    """The card's nominal memory bandwidth (the bound decode figures are a share of): H200 4.8 TB/s, H100 SXM
    3.35 TB/s; other cards (and the CPU) are given the H200's figure, as the earlier reports used."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in HBM.items() if k in name), HBM["H200"])


HBM_BYTES_PER_S = hbm_bytes_per_s()


@dataclass
class Workload(_driver.Shape):
    prompts: int  # rollout batch (prompts per iteration)
    prompt_len: int
    new_tokens: int
    quant: str = "none"  # none | nf4
    ppo_epochs: int = 4
    mini_batch_size: int = 8
    lora: dict = field(default_factory=lambda: dict(r=16, alpha=32, dropout=0.05))

    @property
    def seq(self) -> int:  # what bench_sft.build_random_model reads (max_position_embeddings)
        return self.prompt_len + self.new_tokens


WORKLOADS = {
    # Llama-3.2-1B shape, bf16 base, 64 prompts x 128 tokens, 256 new tokens
    "w5": Workload("w5", 2048, 16, 32, 8, 8192, 128256, True, 64, 128, 256),
    # Llama-3.1-8B shape, NF4 + double quant base, every role an adapter, 16 prompts x 128 tokens, 256 new tokens
    "w5_8b": Workload("w5_8b", 4096, 32, 32, 8, 14336, 128256, False, 16, 128, 256, quant="nf4"),
}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, prompts=4, prompt_len=8,
            new_tokens=8, mini_batch_size=2)


# ---------------------------------------------------------------------------------------------- model and data


def build_reward_adapter(w: Workload, model_dir: Path) -> Path:
    """A fresh SEQ_CLS LoRA + score head on the base, exported by RewardModule.save_adapter (no training: the
    weights do not change the cost). The base is loaded unquantized on the CPU: the adapter's shapes do not depend
    on how the base is held."""
    from lit_ft.models import LoraSpec, ModelSpec
    from lit_ft.stages.reward import RewardModule

    path = model_dir / "reward_adapter"
    if (path / "adapter_config.json").exists():
        return path
    t = time.time()
    torch.manual_seed(2)
    rm = RewardModule(base=ModelSpec(name_or_path=str(model_dir), dtype="bfloat16"), lora=LoraSpec(**w.lora),
                      normalize_on_fit_end=False)
    rm.configure_model()
    with torch.no_grad():  # PEFT inits lora_B to 0; random B makes the reward adapter differ from the base
        for n, p in rm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    rm.save_adapter(path)
    del rm
    print(f"built reward adapter {path} in {time.time() - t:.0f}s", flush=True)
    return path


def make_prompts(w: Workload, n: int) -> list[dict]:
    """`n` rollout batches as the PPO data module yields them: left-padded ids (here no padding), mask, texts."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, w.vocab, (w.prompts, w.prompt_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "prompts": [f"prompt {i}.{j}" for j in range(w.prompts)]})
    return out


class Listed(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def weight_bytes(model) -> dict:
    """Bytes a decode step streams: base weights (LoRA excluded; untied input embedding excluded) + 4-bit absmax."""
    inner = model.get_base_model()
    emb = inner.get_input_embeddings().weight
    tied = inner.get_output_embeddings().weight is emb
    total, lora, quant_state = 0, 0, 0
    for n, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if "lora_" in n:
            lora += b
        elif p is emb and not tied:
            continue
        else:
            total += b
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                quant_state += qs.absmax.numel() * qs.absmax.element_size()
                if getattr(qs, "state2", None) is not None:
                    quant_state += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return {"base": total + quant_state, "quant_state": quant_state, "lora_all_adapters": lora, "tied": tied}


# ---------------------------------------------------------------------------------------------- one variant


class PhaseTimer:
    """Wraps a module's methods: synchronised wall time of every call, per iteration."""

    def __init__(self, device: str):
        self.device, self.iters, self.current = device, [], None

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def wrap(self, obj, name: str, phase: str | None = None):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            self.sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            key = phase or name
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - t
            return out

        setattr(obj, name, timed)


def sampling_and_base(w: Workload, args, device: str, mods: set[str]):
    """The rollout sampling, the base spec and the Lightning precision a variant's modifiers ask for."""
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.models import ModelSpec

    engine = "hf" if "hf" in mods else "static" if mods & {"static", "merged", "nograph"} else "auto"
    sampling = SamplingSpec(max_new_tokens=w.new_tokens, do_sample=True, engine=engine, merged="merged" in mods,
                            cuda_graph="nograph" not in mods, compile="dcompile" in mods,
                            dequantize="dequant" in mods)
    base = ModelSpec(name_or_path=args.model_dir, dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", quantization=w.quant, double_quant=True, compute_dtype="bfloat16",
                     gradient_checkpointing="gc" in mods)
    precision = "bf16-mixed" if w.quant != "none" or "mixed" in mods else "bf16-true"
    if device != "cuda":
        precision = args.cpu_precision
    return sampling, base, precision


def int_mod(mods: set[str], prefix: str, default: int) -> int:
    return next((int(m[len(prefix):]) for m in mods if m.startswith(prefix) and m[len(prefix):].isdigit()), default)


def fp32_heads(module_cls, precision: str):
    """`module_cls` with a workaround: `bf16-true` casts the whole LightningModule, the fp32 value/reward heads
    included, and `roles.head_values` then feeds fp32 hidden states to a bf16 head (dtype error). The heads are
    re-cast to fp32 in place (same Parameter objects, so the optimizer built before this hook keeps them)."""

    class Module(module_cls):
        def on_fit_start(self) -> None:
            if precision == "bf16-true":
                for head in (getattr(self, "value_head", None), self.reward_head):
                    if head is not None:
                        head.float()

    return Module


def run_lit(w: Workload, args, device: str, mods: set[str]) -> dict:
    from lit_ft.models import LoraSpec
    from lit_ft.stages.ppo import PPOModule, PPOSpec

    epochs, mbs = int_mod(mods, "e", w.ppo_epochs), int_mod(mods, "mb", w.mini_batch_size)
    sampling, base, precision = sampling_and_base(w, args, device, mods)
    module = fp32_heads(PPOModule, precision)(
        base=base, lora=LoraSpec(**w.lora), value_model="adapter",
        reward_adapter=str(Path(args.model_dir) / "reward_adapter"), sampling=sampling,
        ppo=PPOSpec(ppo_epochs=epochs, mini_batch_size=mbs), sample_table_every=0, compile="compile" in mods)
    timer = PhaseTimer(device)
    for name in ("rollout", "score", "evaluate_rollout", "ppo_update"):
        timer.wrap(module, name)
    out = fit_timed(w, args, device, module, timer, precision, 1, mods)
    return dict(ppo_epochs=epochs, mini_batch_size=mbs, gradient_checkpointing=base.gradient_checkpointing,
                engine=sampling.engine, merged=sampling.merged, compile="compile" in mods,
                decode_compile=sampling.compile, **out)


def run_grpo(w: Workload, args, device: str, mods: set[str]) -> dict:
    """GRPOModule on the same shapes: `k<N>` samples a prompt (default 8), `mb<N>` rows a minibatch, `it<N>`
    num_iterations; scored by the same reward adapter; the reference is the base (a new LoRA policy)."""
    from lit_ft.online import shared as online
    from lit_ft.stages.grpo import GRPOModule, GRPOSpec
    from lit_ft.models import LoraSpec

    k, mbs, iters = int_mod(mods, "k", 8), int_mod(mods, "mb", w.mini_batch_size), int_mod(mods, "it", 1)
    w = Workload(**{**asdict(w), "prompts": int_mod(mods, "p", w.prompts)})
    sampling, base, precision = sampling_and_base(w, args, device, mods)
    module = fp32_heads(GRPOModule, precision)(
        base=base, lora=LoraSpec(**w.lora), reward_adapter=str(Path(args.model_dir) / "reward_adapter"),
        sampling=sampling, grpo=GRPOSpec(samples_per_prompt=k, mini_batch_size=mbs, num_iterations=iters),
        sample_table_every=0, compile="compile" in mods)
    timer = PhaseTimer(device)
    for name in ("rollout", "score", "grpo_update"):
        timer.wrap(module, name, phase="ppo_update" if name == "grpo_update" else None)
    timer.wrap(online, "old_and_ref_logprobs", phase="evaluate_rollout")  # grpo.py calls it through the module
    out = fit_timed(w, args, device, module, timer, precision, k, mods)
    return dict(samples_per_prompt=k, num_iterations=iters, mini_batch_size=mbs,
                gradient_checkpointing=base.gradient_checkpointing, engine=sampling.engine, merged=sampling.merged,
                decode_compile=sampling.compile, **out)


def fit_timed(w: Workload, args, device: str, module, timer: PhaseTimer, precision: str, per_prompt: int,
              mods: set[str]) -> dict:
    """`args.iters` training steps of `module` through a Trainer, phase times per iteration (the first
    `args.warmup` untimed), generation throughput of the rollout's rows (`per_prompt` a prompt) against the
    bandwidth bound. `memauto`: the memory plan first, as `lit-ft fit` makes it (it may change the rollout batch)."""
    import types

    import lightning as L

    info: dict = {}

    class IterCb(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "weight_bytes" not in info:
                info["weight_bytes"] = weight_bytes(pl_module.model)
                info["adapters"] = list(pl_module.model.peft_config)
                info["model_load_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
            if batch_idx == args.warmup and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer.sync()
            timer.current = {"start": time.perf_counter()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.sync()
            cur = timer.current
            cur["iteration"] = time.perf_counter() - cur.pop("start")
            m = trainer.callback_metrics
            for key in ("time/rollout", "time/update", "ppo/response_length", "objective/scores", "objective/kl",
                        "ppo/loss/policy", "ppo/loss/value", "ppo/epochs", "train/reward", "train/kl",
                        "train/completions/mean_length"):
                if key in m:
                    cur[key] = float(m[key])
            cur["response_width"] = info.get("response_width")
            timer.iters.append(cur)

    # the response width (generated columns, whatever EOS did) from the rollout's own output
    inner_rollout = module.rollout

    def rollout(batch, sampling):
        ro = inner_rollout(batch, sampling)
        info["response_width"] = int(ro.responses.shape[1])
        return ro

    module.rollout = rollout

    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_epochs=1, limit_train_batches=args.iters, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[IterCb()], deterministic=False)
    if "memauto" in mods:
        from lit_ft import fit_memory
        from lit_ft.plan import estimate

        shape = types.SimpleNamespace(batch_size=w.prompts, max_length=w.prompt_len)  # what the plan reads
        said: list[str] = []
        fit_memory(module, shape, trainer, "auto", say=said.append)
        w = Workload(**{**asdict(w), "prompts": shape.batch_size})
        plan = estimate(module, shape, trainer, budget=None, advise=False)
        info.update(memory_plan=said, planned_peak_gb=plan.peak / 1e9, planned_total_gb=plan.total / 1e9,
                    gradient_checkpointing_chosen=module.base.gradient_checkpointing, prompts_chosen=w.prompts)
        print("\n".join(said), flush=True)
    rows = w.prompts * per_prompt
    loader = torch.utils.data.DataLoader(Listed(make_prompts(w, args.iters)), batch_size=None, shuffle=False)
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - t
    timed = timer.iters[args.warmup:] or timer.iters[-1:]
    keys = [k for k in timed[0] if isinstance(timed[0][k], (int, float)) and all(k in it for it in timed)]
    mean = {k: sum(it[k] for it in timed) / len(timed) for k in keys}
    wb = info["weight_bytes"]
    gen_tokens = rows * mean["response_width"]
    gen_tps = gen_tokens / mean["rollout"]
    bound = rows * HBM_BYTES_PER_S / wb["base"]
    return dict(
        precision=precision, fp32_heads_workaround=precision == "bf16-true", rows_per_rollout=rows,
        engine_used=module.sampler.choice if module.sampler is not None else None,
        iterations=timer.iters, timed_iterations=len(timed), mean=mean, fit_s=fit_s,
        generation_tokens=gen_tokens, generation_tokens_per_s=gen_tps,
        decode_step_ms=1e3 * mean["rollout"] / mean["response_width"],
        bandwidth_bound_tokens_per_s=bound, bandwidth_share=gen_tps / bound, **info,
    )


def run_variant(args) -> dict:
    w = workload(args)
    t = time.time()
    device, impl, mods = _driver.start_variant(args.variant)
    extra = {"lit": run_lit, "grpo": run_grpo}[impl](w, args, device, set(mods))
    return dict(workload=w.name, variant=args.variant, iters=args.iters, warmup=args.warmup,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
                peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if device == "cuda" else 0.0,
                wall_s=time.time() - t, **extra)


def workload(args) -> Workload:
    return _driver.pick(WORKLOADS, args, TINY)


# ---------------------------------------------------------------------------------------------- driver


def drive(args) -> None:
    w = workload(args)
    model_dir = _driver.default_model_dir(args, w)
    build_random_model(w, model_dir, "cuda" if torch.cuda.is_available() else "cpu")
    if not (model_dir / "tokenizer_config.json").exists():
        make_tokenizer().save_pretrained(model_dir)  # PPOModule loads the tokenizer from the base directory
    build_reward_adapter(w, model_dir)
    flags = _driver.forward(args, "iters", "warmup", "cpu_precision", "tiny")
    print_table(w, _driver.run_variants(__file__, args, w, flags))


def print_table(w: Workload, results: list[dict]) -> None:
    columns = [("gen s", "7.2f", lambda r: r["mean"]["rollout"]), ("score s", "7.2f", lambda r: r["mean"]["score"]),
               ("no-grad s", "9.2f", lambda r: r["mean"]["evaluate_rollout"]),
               ("update s", "8.2f", lambda r: r["mean"]["ppo_update"]),
               ("iter s", "7.2f", lambda r: r["mean"]["iteration"]),
               ("gen tok/s", "9.0f", lambda r: r["generation_tokens_per_s"]),
               ("bound", "8.0f", lambda r: r["bandwidth_bound_tokens_per_s"]),
               ("share", "6.1%", lambda r: r["bandwidth_share"]), ("peak GiB", "8.2f", lambda r: r["peak_gib"])]
    _driver.print_table(f"{w.name}: {w.prompts} prompts x {w.prompt_len} tokens, {w.new_tokens} new tokens, quant "
                        f"{w.quant}, LoRA {w.lora}", results, "mean", columns, width=14)


def main(argv=None) -> None:
    p = _driver.parser(__doc__, WORKLOADS, "w5", "lit")
    p.add_argument("--iters", type=int, default=2, help="PPO iterations (rollout batches), warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--cpu-precision", default="32-true", help="Lightning precision on a CPU (dry runs)")
    _driver.dispatch(_driver.parse(p, argv), run_variant, drive, hide="iterations")


if __name__ == "__main__":
    main()
