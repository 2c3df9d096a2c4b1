"""The driver every benchmark script shares: the command line they have in common, one process a variant (clean
peak memory, no patched modules or compile caches shared between variants), the JSON file rewritten after every
variant, and the results table.

A script defines its own settings, `run_variant(args) -> dict` (one variant in this process) and its table's
columns; `main` is then `dispatch(args, run_variant, drive)`, where `drive` builds the model once and calls
`run_variants`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

Column = tuple[str, str, Callable[[dict], object]]
"""(header, format spec, value of a result): one column of a results table; the spec's number is its width."""


# ---------------------------------------------------------------------------------------------- workloads


@dataclass
class Shape:
    """The Llama shape every workload starts with (what `bench_sft.build_random_model` builds); a script's
    `Workload` adds its own fields after these."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


def pick(workloads: dict, args: argparse.Namespace, tiny: dict | Callable[[Shape], dict]):
    """--workload of `workloads`; with --tiny at the tiny shapes `tiny` (or `tiny(workload)`) for a CPU dry run;
    with --lora-dropout (where a script has it) at that LoRA dropout."""
    w = workloads[args.workload]
    if args.tiny:
        w = type(w)(**{**asdict(w), **(tiny(w) if callable(tiny) else tiny), "name": w.name})
    if getattr(args, "lora_dropout", None) is not None:
        w.lora = {**w.lora, "dropout": args.lora_dropout}
    return w


def peak_memory(device: str) -> dict:
    """Peak allocated and reserved GPU memory in GB since the last reset (0 on a CPU)."""
    cuda = device == "cuda"
    return dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
                peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0)


# ---------------------------------------------------------------------------------------------- command line


def parser(doc: str, workloads: dict, workload: str, variants: str) -> argparse.ArgumentParser:
    """The options every script starts with: the workload, the variants (driver) or the one variant (its process),
    the random model's directory."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--workload", choices=sorted(workloads), default=workload)
    p.add_argument("--variants", default=variants, help="comma-separated (driver mode)")
    p.add_argument("--variant", help="run this one variant in this process (used by the driver)")
    p.add_argument("--model-dir", help="where the random model is saved (default /tmp/lit_ft_bench_<workload>)")
    return p


def add_steps(p: argparse.ArgumentParser) -> None:
    """Timed optimizer steps after untimed warm-up steps."""
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--run-steps", type=int, default=None,
                   help="`mem*` variants: the optimizer steps of the run the memory plan plans for (whether compiling "
                        "pays depends on it; default: the steps run here, warm-up included)")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The options every script ends with (a variant's time limit, the JSON file), then the parsed arguments."""
    p.add_argument("--variant-timeout", type=int, default=540)
    p.add_argument("--json", required=True, help="where to write the results")
    return p.parse_args(argv)


def forward(args: argparse.Namespace, *names: str) -> list[str]:
    """The settings `names` of `args` as command-line flags for a variant's process: a switch that is on as its
    flag alone, an unset (None) or off one left out."""
    flags = []
    for name in names:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def dispatch(args: argparse.Namespace, run_variant: Callable, drive: Callable, hide: str = "losses") -> None:
    """With --variant: run it here, write its result to --json and print it (without the long `hide` list);
    otherwise drive every variant."""
    if args.variant:
        res = run_variant(args)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != hide}), flush=True)
    else:
        drive(args)


# ---------------------------------------------------------------------------------------------- variants


def start_variant(variant: str) -> tuple[str, str, list[str]]:
    """The device, the variant's implementation and its `+` modifiers, for a variant's process; TF32 matmuls off
    on CUDA (what every runner gets by default)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    impl, *mods = variant.split("+")
    cap = next((float(m[3:]) for m in mods if m.startswith("cap") and m[3:].replace(".", "", 1).isdigit()), None)
    if cap is not None and device == "cuda":  # `cap24`: this process may allocate 24 GB of the card, no more
        torch.cuda.set_per_process_memory_fraction(cap * 1e9 / torch.cuda.get_device_properties(0).total_memory)
    return device, impl, mods


def default_model_dir(args: argparse.Namespace, w) -> Path:
    """--model-dir, by default /tmp/lit_ft_bench_<workload>[_tiny] (set on `args` for the variants' processes)."""
    args.model_dir = args.model_dir or f"/tmp/lit_ft_bench_{w.name}{'_tiny' if args.tiny else ''}"
    return Path(args.model_dir)


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


def run_variants(script: str, args: argparse.Namespace, w, flags: list[str],
                 skip: Callable[[str], str | None] | None = None) -> list[dict]:
    """Run each of --variants in its own process of `script` (with `flags`, the settings its process needs) and
    return their results; --json is rewritten after every variant (workload, versions, results so far), so a crash
    later keeps what ran. `skip(variant)`: a reason not to run it (recorded as `skipped`), or None."""
    results = []
    for variant in args.variants.split(","):
        print(f"--- {w.name} {variant}", flush=True)
        reason = skip(variant) if skip is not None else None
        if reason:
            print(f"{reason}: skipped", flush=True)
            results.append(dict(workload=w.name, variant=variant, skipped=reason))
            continue
        out = Path(args.json).with_suffix(f".{variant.replace('+', '_')}.part.json")
        cmd = [sys.executable, script, "--workload", args.workload, "--variant", variant, "--model-dir",
               args.model_dir, "--json", str(out), *flags]
        results.append(run_process(cmd, out, w.name, variant, args.variant_timeout))
        Path(args.json).write_text(json.dumps(dict(workload=asdict(w), versions=versions(), results=results),
                                              indent=1))
    return results


def run_process(cmd: list[str], out: Path, workload: str, variant: str, timeout: int) -> dict:
    """One variant's process: its result from the part file `out`, or an `error` with the tail of its output."""
    t = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        ok, tail = False, f"timeout after {timeout}s: {str(e.stdout or '')[-2000:]}"
    if ok:
        res = json.loads(out.read_text())
        out.unlink()
        return res
    print(tail, flush=True)
    return dict(workload=workload, variant=variant, error=tail[-800:], wall_s=time.time() - t)


# ---------------------------------------------------------------------------------------------- table


def print_table(title: str, results: list[dict], done: str, columns: list[Column], width: int = 24) -> None:
    """The results table: `title`, a header, a row a variant (`done`: the key only a finished result has; the
    others show why they did not finish)."""
    print(f"\n{title}")
    print(f"{'variant':{width}s} " + " ".join(f"{header:>{_width(spec)}s}" for header, spec, _ in columns))
    for r in results:
        if done not in r:
            why = f"SKIPPED: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error'][-160:]!r}"
            print(f"{r['variant']:{width}s} {why}")
            continue
        print(f"{r['variant']:{width}s} " + " ".join(format(value(r), spec) for _, spec, value in columns))


def _width(spec: str) -> int:
    digits = spec.lstrip("<>^=")
    return int(digits[: len(digits) - len(digits.lstrip("0123456789"))] or 0)


def finished(results: list[dict], done: str) -> dict:
    """The finished results by variant name."""
    return {r["variant"]: r for r in results if done in r}


def versus(ref: dict, base: str, key: str) -> Column:
    """A column `vs <base>`: each result's `key` as a multiple of variant `base`'s (``-`` when `base` did not
    finish; `ref`: the finished results)."""
    header = f"vs {base}"
    return header, f">{max(6, len(header))}s", lambda r: f"{r[key] / ref[base][key]:.2f}" if base in ref else "-"


def loss_columns(spec: str) -> list[Column]:
    """The first and the last timed step's loss."""
    return [("loss0", spec, lambda r: r["first_loss"] or 0), ("lossN", spec, lambda r: r["last_loss"] or 0)]
