"""Rollout decoding per engine against the bandwidth bound, and whole PPO iterations (W5) per engine and phase.

    python benchmarks/bench_rollout.py --out $OUT/rollout_1b.json                                  # 1B sweep + W5
    python benchmarks/bench_rollout.py --shape 8b_nf4 --batches 16 --engines hf,static --out $OUT/rollout_8b.json
    python benchmarks/bench_rollout.py --tiny --out /tmp/rollout.json                                 # CPU dry run
    python benchmarks/bench_rollout.py --engines '' --ppo-engines '' --mismatch hf:64,static:64,merged:64 --out m.json

Decode sweep: the random-init model of `bench_ppo.py` (its workload shapes: Llama-3.2-1B bf16, or Llama-3.1-8B
NF4 + double quant with bf16 autocast, as PPO runs it), with the roles PPO builds (`roles.build_roles`: a LoRA policy
r16 on every projection + a value adapter), eval mode. For each engine and batch: untimed warm-up (short; the
static engine allocates its cache for the full length and captures its graph there), then one synchronised
rollout of `--new-tokens` tokens from `--prompt-len`-token prompts, sampled at temperature 1 with no EOS (every
row decodes the full length, so every engine does the same work).

Engines: `hf` (`lit_ft.online.generation.generate`: transformers' `generate` through PEFT), `static`
(`lit_ft.online.engine.DecodeEngine`: static cache, CUDA-graph replay on CUDA), `merged` (the same with the policy LoRA
merged into a rollout copy; a 4-bit base de-quantized into it); `+compile` after `static` or `merged`: the step's forward through
torch.compile before its capture (`SamplingSpec.compile`); `+dequant` (4-bit bases): the weights de-quantized once a
rollout, the LoRA kept (`SamplingSpec.dequantize`).

Bandwidth bound (the card's nominal HBM bandwidth, `bench_ppo.hbm_bytes_per_s`: H100 SXM 3.35 TB/s, H200 4.8 TB/s): one decode step must read the base weights once (`W`, bytes as
`bench_ppo.weight_bytes` counts them: the input embedding is a lookup and excluded, a tied LM head counted once,
4-bit quantization constants included; LoRA excluded) and each row's KV cache up to its current length:

    bytes_step(B) = W + B * kv_bytes_per_token * (P + (N - 1) / 2)      (mean context over the N steps)
    bound tokens/s = B * 4.8e12 / bytes_step(B);   share = achieved tokens/s / bound

with `kv_bytes_per_token = layers * 2 * kv_heads * head_dim * 2` (bf16 keys and values). The static engine
attends over its whole allocated cache (P + N slots) every step; that extra read is its cost, not part of the bound.

PPO iterations: `bench_ppo.py`'s W5 driver (same model directory, reward adapter, Lightning Trainer and phase
timers), one process per engine (`lit+hf`, `lit+static`, `lit+merged`), `--ppo-iters` iterations of which the first
is an untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ppo  # noqa: E402  (puts the repository root on sys.path)
from bench_ppo import HBM_BYTES_PER_S, WORKLOADS, weight_bytes  # noqa: E402
from bench_sft import build_random_model, make_tokenizer, versions  # noqa: E402

SHAPES = {"1b": "w5", "8b_nf4": "w5_8b"}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, prompts=4, prompt_len=8,
            new_tokens=8, mini_batch_size=2)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_policy(w, model_dir: Path, device: str):
    """The PPO roles on the random base (policy + value adapters), cast as PPO runs them, in eval mode."""
    from lit_ft.online import roles
    from lit_ft.models import LoraSpec, ModelSpec

    spec = ModelSpec(name_or_path=str(model_dir), dtype="bfloat16" if device == "cuda" else "float32",
                     attn_implementation="sdpa", quantization=w.quant, double_quant=True, compute_dtype="bfloat16")
    model, _ = roles.build_roles(spec, LoraSpec(**w.lora), None, None, "adapter", torch.device(device))
    roles.disable_dropout(model)
    with torch.no_grad():  # PEFT starts lora_B at 0; a trained policy's is not (same cost, honest merge)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    if w.quant == "none":
        model.to(device)  # load_base places only quantized weights; Lightning moves the rest in a fit
        if device == "cuda":
            model.to(torch.bfloat16)  # what precision bf16-true does to the LoRA weights
    return model.eval()


def kv_bytes_per_token(w) -> int:
    return w.layers * 2 * w.kv_heads * (w.hidden // w.heads) * 2


def engine_spec(engine: str, w):
    """The sampling settings an engine name stands for: `hf`, `static` or `merged`, `+compile` for the static
    engine's compiled step (`SamplingSpec.compile`)."""
    from lit_ft.online.generation import SamplingSpec

    name, *mods = engine.split("+")
    unknown = set(mods) - {"compile", "dequant"}
    if name not in ("hf", "static", "merged") or unknown or ("compile" in mods and name == "hf"):
        raise SystemExit(f"unknown engine {engine!r}: hf, static or merged, then +compile, +dequant")
    return SamplingSpec(max_new_tokens=w.new_tokens, do_sample=True, engine="hf" if name == "hf" else "static",
                        merged=name == "merged", compile="compile" in mods, dequantize="dequant" in mods)


def decode_point(model, w, engine: str, batch: int, device: str) -> dict:
    """One engine at one batch size: warm-up, then one timed rollout of w.new_tokens tokens."""
    from lit_ft.online.sampler import Sampler

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, w.vocab, (batch, w.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    spec = engine_spec(engine, w)
    sampler = Sampler(model, eos_token_id=10**9, pad_token_id=0)  # no EOS: every row decodes the full length
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and w.quant != "none")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with autocast:
        sampler(ids, mask, spec, max_new_tokens=min(8, w.new_tokens))  # warm-up (allocation, graph capture)
        sync(device)
        t = time.perf_counter()
        responses, _ = sampler(ids, mask, spec)
        sync(device)
        seconds = time.perf_counter() - t
    steps = responses.shape[1]
    wb = weight_bytes(model)["base"]
    step_bytes = wb + batch * kv_bytes_per_token(w) * (w.prompt_len + (steps - 1) / 2)
    bound = batch * HBM_BYTES_PER_S / step_bytes
    tps = batch * steps / seconds
    merged = sampler.engine.weights if sampler.engine is not None else None
    out = dict(engine=engine, batch=batch, new_tokens=steps, seconds=seconds, tokens_per_s=tps,
               step_ms=1e3 * seconds / steps, weight_bytes=wb, bytes_per_step=step_bytes,
               bound_tokens_per_s=bound, bandwidth_share=tps / bound,
               merged_copy_bytes=merged.nbytes if merged is not None else 0,
               cuda_graph=bool(sampler.engine is not None and sampler.engine.graphs),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0)
    del sampler
    print(f"{engine:7s} batch {batch:4d}: {tps:9.0f} tok/s, {out['step_ms']:7.2f} ms/step, "
          f"bound {bound:9.0f}, share {tps / bound:6.1%}", flush=True)
    return out


@torch.no_grad()
def mismatch_point(model, w, engine: str, batch: int, device: str) -> dict:
    """The sampler's log-probs of its own tokens against the training forward's (the PPO/GRPO old log-probs: one
    pass over prompt + response with the policy adapter, `lit_ft.online.roles`), same weights, as every rollout logs
    them (`rollout/logprob_diff_*`, `lit_ft.losses.rollout_mismatch`)."""
    from lit_ft.losses import rollout_mismatch
    from lit_ft.online import roles
    from lit_ft.online.sampler import Sampler

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, w.vocab, (batch, w.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    spec = engine_spec(engine, w)
    sampler = Sampler(model, eos_token_id=10**9, pad_token_id=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and w.quant != "none")
    with autocast:
        torch.manual_seed(batch)
        responses, rmask, sampler_lp = sampler(ids, mask, spec, logprobs=True)
        model.set_adapter(roles.POLICY)
        seq, smask, pos = roles.sequence(ids, mask, responses, rmask)
        hidden = roles.response_hidden(roles.trunk(model, seq, smask, pos), ids.shape[1])
        train_lp, _ = roles.token_logprobs(model, hidden, responses, spec.temperature)
    stats = {k: float(v) for k, v in rollout_mismatch(sampler_lp, train_lp.float(), rmask).items()}
    del sampler
    print(f"mismatch {engine:7s} batch {batch}: mean |diff| {stats['logprob_diff_mean']:.4f}, max "
          f"{stats['logprob_diff_max']:.3f}, KL(sampler||trainer) a sequence {stats['kl_sampler_train']:.4f}",
          flush=True)
    return dict(engine=engine, batch=batch, new_tokens=responses.shape[1], **stats)


def profile_point(model, w, engine: str, batch: int, device: str, steps: int = 16) -> dict:
    """Where a decode step's time goes: the engine's step run eagerly under the profiler (its CUDA kernels by
    name, count and time a step) and its captured graph replayed (wall time a step, and the kernel time inside
    it when the profiler sees the graph's kernels). Wall minus kernel time is launch and idle time; kernel time
    against the bound's time a step is how far the kernels themselves are from streaming the bytes."""
    from torch.profiler import ProfilerActivity, profile

    from lit_ft.online.sampler import Sampler

    if engine.startswith("hf"):
        raise ValueError("profile: the static engine's step only (static, merged, +compile)")
    steps = max(1, min(steps, w.new_tokens - 6))  # the 4 warm-up steps and the prefill's token fit the buffers
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, w.vocab, (batch, w.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    spec = engine_spec(engine, w)
    sampler = Sampler(model, eos_token_id=10**9, pad_token_id=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and w.quant != "none")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def kernels(prof) -> tuple[list[dict], float, int]:
        rows = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
                and str(e.device_type).endswith("CUDA") and e.count]
        rows.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in rows) / steps / 1e3  # ms a step
        count = sum(e.count for e in rows) / steps
        top = [dict(name=e.key[:120], per_step=e.count / steps, ms_per_step=e.self_device_time_total / steps / 1e3)
               for e in rows[:20]]
        return top, total, count

    out = dict(engine=engine, batch=batch, steps=steps)
    with autocast:
        sampler(ids, mask, spec)  # allocation, graph capture, one full rollout
        eng = sampler.engine
        graph = eng.graphs.get(tuple(eng.sampling.values()))
        with eng._policy_context():
            pids, pmask = eng._pad_to_shape(ids, mask)
            eng._prefill(pids, pmask)
            for _ in range(4):
                eng.step()
            sync(device)
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    eng.step()
                sync(device)
            top, ms, count = kernels(prof)
            out.update(eager_kernels_per_step=count, eager_kernel_ms_per_step=ms, eager_top=top)
            if graph is not None:
                eng._prefill(pids, pmask)
                sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    graph.replay()
                sync(device)
                out["graph_wall_ms_per_step"] = 1e3 * (time.perf_counter() - t) / steps
                eng._prefill(pids, pmask)
                with profile(activities=acts) as prof:
                    for _ in range(steps):
                        graph.replay()
                    sync(device)
                top, ms, count = kernels(prof)
                out.update(graph_kernels_per_step=count, graph_kernel_ms_per_step=ms, graph_top=top[:10])
    wb = weight_bytes(model)["base"]
    ctx = w.prompt_len + 8
    out["bound_ms_per_step"] = 1e3 * (wb + batch * kv_bytes_per_token(w) * ctx) / HBM_BYTES_PER_S
    print(f"profile {engine} batch {batch}: eager {out['eager_kernels_per_step']:.0f} kernels "
          f"{out['eager_kernel_ms_per_step']:.2f} ms; graph wall {out.get('graph_wall_ms_per_step', 0):.2f} ms, "
          f"kernels {out.get('graph_kernel_ms_per_step', 0):.2f} ms; bound {out['bound_ms_per_step']:.2f} ms", flush=True)
    for k in out["eager_top"][:12]:
        print(f"   {k['ms_per_step']:7.3f} ms  x{k['per_step']:5.1f}  {k['name']}", flush=True)
    del sampler
    return out


def decode_sweep(w, args, device: str) -> list[dict]:
    model = build_policy(w, Path(args.model_dir), device)
    results = []
    for engine in filter(None, args.engines.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                results.append(decode_point(model, w, engine, batch, device))
            except (RuntimeError, ValueError) as e:  # e.g. out of memory at batch 256: record it and go on
                results.append(dict(engine=engine, batch=batch, error=repr(e)[-600:]))
                print(f"{engine} batch {batch}: FAILED {e!r}"[:300], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    for key, points, measure in (("mismatch", args.mismatch, mismatch_point), ("profile", args.profile, profile_point)):
        for point in filter(None, (points or "").split(",")):
            engine, batch = point.split(":")
            try:
                results.append({key: measure(model, w, engine, int(batch), device)})
            except (RuntimeError, ValueError) as e:
                results.append({key: dict(engine=engine, batch=int(batch), error=repr(e)[-600:])})
                print(f"{key} {point}: FAILED {e!r}"[:300], flush=True)
    del model
    return results


def ppo_iterations(args) -> dict | None:
    """bench_ppo's W5 driver, one subprocess per engine; its JSON is returned (and kept next to --out)."""
    if not args.ppo_engines:
        return None
    out = Path(args.out).with_suffix(".ppo.json")
    argv = ["--workload", SHAPES[args.shape], "--model-dir", args.model_dir,
            # an engine's `+compile` is the decode step's (bench_ppo's `dcompile`; its `compile` is the update's)
            "--variants", ",".join(f"lit+{e.replace('+compile', '+dcompile')}" + args.ppo_mods
                                   for e in args.ppo_engines.split(",")),
            "--iters", str(args.ppo_iters), "--warmup", str(min(1, args.ppo_iters - 1)), "--json", str(out),
            "--variant-timeout", str(args.variant_timeout)]
    if args.tiny:
        argv.append("--tiny")
    bench_ppo.main(argv)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--engines", default="hf,static,merged", help="decode sweep: comma-separated hf,static,merged "
                                                             "(static and merged also +compile)")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--profile", default="", help="ENGINE:BATCH,... : profile the decode step (kernels, graph)")
    p.add_argument("--mismatch", default="", help="ENGINE:BATCH,... : the sampler's log-probs against the training "
                                                  "forward's (rollout/logprob_diff_*)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ppo-engines", default="hf,static,merged", help="W5 iterations per engine ('' to skip)")
    p.add_argument("--ppo-mods", default="", help="bench_ppo modifiers added to every W5 variant, e.g. +gc")
    p.add_argument("--ppo-iters", type=int, default=2, help="W5 iterations, the first an untimed warm-up")
    p.add_argument("--variant-timeout", type=int, default=240)
    p.add_argument("--model-dir", help="random model directory (default /tmp/lit_ft_bench_<workload>[_tiny])")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, batches 2,4 (CPU dry run)")
    p.add_argument("--out", required=True, help="JSON results")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = WORKLOADS[SHAPES[args.shape]]
    if args.tiny:
        w = replace(w, **TINY)
        args.batches = "2,4" if args.batches == p.get_default("batches") else args.batches
    else:
        w = replace(w, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    args.model_dir = args.model_dir or f"/tmp/lit_ft_bench_{w.name}{'_tiny' if args.tiny else ''}"
    build_random_model(w, Path(args.model_dir), device)
    if not (Path(args.model_dir) / "tokenizer_config.json").exists():
        make_tokenizer().save_pretrained(args.model_dir)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    t = time.time()
    report = dict(shape=args.shape, workload=asdict(w), versions=versions(), device=device,
                  hbm_bytes_per_s=HBM_BYTES_PER_S, kv_bytes_per_token=kv_bytes_per_token(w),
                  bound_formula="B * 4.8e12 / (W + B * kv_bytes_per_token * (P + (N - 1) / 2))",
                  decode=decode_sweep(w, args, device))
    report["decode_s"] = time.time() - t
    Path(args.out).write_text(json.dumps(report, indent=1))
    report["ppo"] = ppo_iterations(args)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
