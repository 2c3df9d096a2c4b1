"""Host work of one training step, without the arithmetic: what a launch-bound small model pays on any device.

A Llama with the layer count of the model in question (default SmolLM2-135M's 30 layers, 9 heads, 3 KV heads) but a
width of 64, on the CPU with one thread and a micro-batch of 2 x 8 tokens, so the kernels are nothing and the
time a step is Python, dispatch and framework work: PEFT's LoRA forward, checkpointing's hooks, autograd, the
optimizer, the guard, Lightning. `plain` is a loop of transformers' forward with `labels` + backward + torch AdamW
over the same PEFT model (the floor); `lit` is SFTModule under a Lightning Trainer. The runs alternate, each in its
own process, and the median of the runs of each is printed (the 2-core machine is noisy).

    python benchmarks/bench_host.py --variants plain+gc,lit+gc --repeats 3
    python benchmarks/bench_host.py --variants lit+gc --root .old     # another checkout of lit_ft, same model

Modifiers: `gc` (gradient checkpointing: the plain loop's non-reentrant, lit_ft's its own `checkpoint_layer`), `reent`
(the plain loop's checkpointing reentrant), `nodrop` (LoRA dropout 0).

`--lora-call`: instead, the host time of one LoRA Linear's forward + backward by PEFT and by two rewrites of it (plain
ops; the branch as one custom autograd Function), on equal outputs.

`--switch`: instead, the host time of switching adapters as PPO's minibatch does (to the value adapter and back),
by `AdapterRoles` and by PEFT's `set_adapter` followed by the roles' flags (a model of --layers layers with two
adapters on every projection).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def one(variant: str, layers: int, steps: int, warmup: int, model_dir: str) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    impl, *mods = variant.split("+")
    gc, drop = "gc" in mods, 0.0 if "nodrop" in mods else 0.05
    ids = torch.randint(0, 512, (steps + warmup, 2, 8))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    times: list[float] = []
    if impl == "plain":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": "reent" in mods})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=drop, target_modules="all-linear"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for b in batches:
            t = time.perf_counter()
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    else:
        import lightning as L

        from lit_ft.models import LoraSpec, ModelSpec
        from lit_ft.stages.sft import SFTModule
        from lit_ft.train.optim import OptimSpec

        module = SFTModule(base=ModelSpec(name_or_path=model_dir, dtype="float32", attn_implementation="sdpa",
                                          gradient_checkpointing=gc),
                           lora=LoraSpec(r=16, alpha=32, dropout=drop),
                           optim=OptimSpec(lr=1e-4, warmup_steps=0, scheduler="constant"))

        class Clock(L.Callback):
            def on_train_batch_start(self, *a):
                self.t = time.perf_counter()

            def on_train_batch_end(self, *a):
                times.append(time.perf_counter() - self.t)

        trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return 1e3 * statistics.median(times[warmup:])


def switch_times(layers: int, repeats: int = 50) -> dict[str, float]:
    """ms a switch pair (value and back) by AdapterRoles and by PEFT's set_adapter + the roles' flags."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_ft.online.roles import AdapterRoles

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=512)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear"), adapter_name="policy")
    model.add_adapter("value", LoraConfig(r=8, target_modules="all-linear"))
    roles = AdapterRoles(model, ["policy", "value"])

    def peft_switch(name):
        model.set_adapter(name)
        roles.restore_flags()

    out = {}
    for label, fn in (("roles", roles._switch), ("peft", peft_switch)):
        for _ in range(3):
            fn("value"), fn("policy")
        t = time.perf_counter()
        for _ in range(repeats):
            fn("value"), fn("policy")
        out[label] = 1e3 * (time.perf_counter() - t) / repeats
    return out


class _LoraBranch:
    """`--lora-call`'s two rewrites of a PEFT LoRA Linear forward (one active adapter, no dropout): `lean`, the same
    arithmetic as plain torch ops (base linear, A, then B added by one addmm); `fused`, the LoRA branch as one
    custom autograd Function with a hand-written backward (one graph node instead of four)."""

    @staticmethod
    def lean(self, x):
        import torch
        import torch.nn.functional as F

        a = self.active_adapters[0]
        out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        xa = F.linear(x, self.lora_A[a].weight)
        return torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), self.lora_B[a].weight.t(),
                           alpha=self.scaling[a]).view(out.shape)

    @staticmethod
    def fused(self, x):
        a = self.active_adapters[0]
        return _branch().apply(self.base_layer(x), x, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a])


_BRANCH = []


def _branch():
    """`_LoraBranch.fused`'s autograd Function (made once: torch is imported lazily in this script)."""
    if not _BRANCH:
        import torch

        class Branch(torch.autograd.Function):
            @staticmethod
            def forward(ctx, base, x, A, B, s):
                x2 = x.reshape(-1, x.shape[-1])
                xa = x2 @ A.t()
                ctx.save_for_backward(x2, A, B, xa)
                ctx.s, ctx.shape = s, x.shape
                return torch.addmm(base.reshape(-1, base.shape[-1]), xa, B.t(), alpha=s).view(base.shape)

            @staticmethod
            def backward(ctx, g):
                x2, A, B, xa = ctx.saved_tensors
                g2 = g.reshape(-1, g.shape[-1])
                gb = (g2 @ B).mul_(ctx.s)
                return g, (gb @ A).view(ctx.shape), gb.t() @ x2, (g2.t() @ xa).mul_(ctx.s), None

        _BRANCH.append(Branch)
    return _BRANCH[0]


def lora_call_times(layers: int = 50, rounds: int = 3) -> dict[str, float]:
    """us a LoRA Linear's forward + backward (width 64, 16 rows, one thread): PEFT's forward against the rewrites
    of `_LoraBranch` (equal outputs, checked), best of `rounds` interleaved rounds."""
    import types

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.set_num_threads(1)

    def model(forward):
        torch.manual_seed(0)
        m = get_peft_model(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(layers)]),
                           LoraConfig(r=16, target_modules=[str(i) for i in range(layers)], init_lora_weights=False))
        for mod in m.modules():
            if forward is not None and type(mod) is LoraLinear:
                mod.forward = types.MethodType(forward, mod)
        return m

    x = torch.randn(16, 64, requires_grad=True)
    variants = {"peft": None, "lean": _LoraBranch.lean, "fused": _LoraBranch.fused}
    want = model(None)(x)
    best = {}
    for _ in range(rounds):
        for name, forward in variants.items():
            m = model(forward)
            torch.testing.assert_close(m(x), want)
            for _ in range(7):
                t = time.perf_counter()
                for _ in range(10):
                    m(x).sum().backward()
                best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / 10 / layers * 1e6)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="plain+gc,lit+gc")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=str(HERE.parents[1]), help="the lit_ft checkout the `lit` variants import")
    p.add_argument("--model-dir", default="/tmp/lit_ft_bench_host")
    p.add_argument("--switch", action="store_true", help="time adapter switches instead of training steps")
    p.add_argument("--lora-call", action="store_true",
                   help="time one LoRA Linear's forward + backward: PEFT's against two rewrites")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lora_call:
        for label, us in lora_call_times().items():
            print(f"{label:6s} {us:7.1f} us a LoRA Linear, forward + backward")
        return
    if args.switch:
        sys.path.insert(0, args.root)
        for label, ms in switch_times(args.layers).items():
            print(f"{label:6s} {ms:7.2f} ms a switch pair ({args.layers} layers)")
        return
    if args.one:
        sys.path.insert(0, args.root)
        print(json.dumps(one(args.one, args.layers, args.steps, args.warmup, args.model_dir)))
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(args.model_dir)
    runs: dict[str, list[float]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeats):
        for v in runs:
            out = subprocess.run([sys.executable, str(HERE), "--one", v, "--root", args.root, "--layers",
                                  str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--model-dir", args.model_dir], capture_output=True, text=True, check=True)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for v, ms in runs.items():
        print(f"{v:20s} {statistics.median(ms):7.1f} ms a step (runs: {', '.join(f'{x:.1f}' for x in ms)})")


if __name__ == "__main__":
    main()
