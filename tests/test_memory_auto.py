"""`--memory auto | SIZE`: the plan chooses the settings before any weights load. The choice for a budget against
the planner's own totals, the settings reaching the run, an impossible budget refused with the smallest that would
fit, and `auto` without a GPU leaving the run alone. (That micro-batch + accumulation and checkpointing keep the loss
and gradients: tests/test_resume.py's CountWeighting tests and tests/test_plan.py's checkpointing ones.)"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lit_ft import LoraSpec, ModelSpec
from lit_ft.cli.app import main
from lit_ft.errors import ConfigError
from lit_ft.plan import Settings, estimate_settings
from lit_ft.plan.auto import choose
from lit_ft.train.optim import OptimSpec
from tests.test_hostile import BASE, fit_args, one_error_line, sft_file  # noqa: F401  (sft_file is a fixture)


def settings(**kw) -> Settings:
    return Settings(stage="sft", base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4), optim=OptimSpec(),
                    max_length=64, **{"batch_size": 8, "target": "cpu", **kw})


def total(s: Settings) -> int:
    return estimate_settings(s, budget=None, advise=False).total


def test_a_run_that_fits_is_left_as_configured():
    s = settings()
    assert choose(s, total(s)) == (s, [], [])


def test_the_fastest_combination_that_fits_is_chosen(monkeypatch):
    """Where both halving the micro-batch and checkpointing fit, the step-time model decides: on a launch-bound
    model (the GPU rates on the tiny model: a micro-batch costs fixed time a layer, its matmuls almost nothing)
    recomputing is cheaper than a second micro-batch; where compute is all that costs, splitting the micro-batch
    is free and recomputing is not. Either way no single lever that fits is modelled faster than the choice."""
    from lit_ft.plan import auto, memory

    s = settings(target="cuda")
    half = dataclasses.replace(s, batch_size=4, accumulate_grad_batches=2)
    ckpt = dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=True))
    budget = max(total(half), total(ckpt))
    assert total(s) > budget
    chosen, whats, args = choose(s, budget)
    assert chosen.base.gradient_checkpointing and chosen.batch_size == 8, whats
    assert auto.step_seconds(ckpt) < auto.step_seconds(half)
    singles = [c for _, _, c, kind in memory.levers(s) if kind != "quantization" and total(c) <= budget]
    assert singles and all(auto.step_seconds(c) >= auto.step_seconds(chosen) for c in singles)
    monkeypatch.setitem(auto.RATES, "cuda", dict(auto.RATES["cuda"], layer_s=0.0, step_s=0.0, flops=1e3))
    chosen, whats, args = choose(s, budget)
    assert (chosen.batch_size, chosen.accumulate_grad_batches) == (4, 2) and not chosen.base.gradient_checkpointing
    assert args == ["--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2"]


def test_spare_memory_buys_speed_only_with_the_margin():
    """A run configured lean (checkpointing, micro-batches of 2 accumulated 4 times) on a card with room: auto turns
    checkpointing off and folds the accumulation into one micro-batch of 8 (the effective batch kept), as long as
    the plan stays within SPEED_MARGIN of the budget; at a budget it only just fits, it is left as configured."""
    from lit_ft.plan import auto

    s = settings(batch_size=2, accumulate_grad_batches=4, target="cuda")
    s = dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=True))
    fast = dataclasses.replace(s, batch_size=8, accumulate_grad_batches=1,
                               base=dataclasses.replace(s.base, gradient_checkpointing=False))
    chosen, whats, args = choose(s, 80 * 2**30)
    assert (chosen.batch_size, chosen.accumulate_grad_batches, chosen.base.gradient_checkpointing) == (8, 1, False)
    assert args == ["--model.base.gradient_checkpointing", "false", "--data.batch_size", "8",
                    "--trainer.accumulate_grad_batches", "1"]
    assert auto.step_seconds(fast) < auto.step_seconds(s)
    assert choose(s, total(s)) == (s, [], [])  # fits, but nothing faster fits within the margin
    assert total(fast) > auto.SPEED_MARGIN * total(s)


def test_the_loss_chunk_goes_down_to_what_the_budget_needs(tmp_path):
    """The float32 logits of one loss chunk are a large vocabulary's biggest transient (a config of SmolLM2's
    vocabulary, 49,152): with checkpointing already on, a budget between the plans at chunk 512 and 1024 gets 512
    (not 256: the larger chunk that fits costs fewer launches), and the plan falls with the chunk."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=49152).save_pretrained(tmp_path)
    s = dataclasses.replace(settings(batch_size=8, loss_chunk_size=4096), max_length=256,
                            base=ModelSpec(name_or_path=str(tmp_path), gradient_checkpointing=True))
    by_chunk = {c: total(dataclasses.replace(s, loss_chunk_size=c)) for c in (4096, 1024, 512, 256)}
    assert by_chunk[4096] > by_chunk[1024] > by_chunk[512] > by_chunk[256]
    chosen, whats, args = choose(s, (by_chunk[512] + by_chunk[1024]) // 2)
    assert chosen.loss_chunk_size == 512 and args[-2:] == ["--model.loss_chunk_size", "512"], whats


def test_a_4bit_base_is_never_chosen_and_an_impossible_budget_names_the_leanest():
    s = settings(batch_size=1)
    leanest = dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=True), loss_chunk_size=256)
    with pytest.raises(ConfigError, match=r"memory: nothing fits 1.00 KiB: .* need ") as info:
        choose(s, 1024)
    needed = re.search(r"need ([\d.]+ \w+)", str(info.value)).group(1)
    from lit_ft.plan.sizes import fmt

    assert needed == fmt(min(total(leanest), total(dataclasses.replace(s, base=leanest.base))))
    # a budget that only a 4-bit base would meet (4 tokens a row: the weights dominate) is refused, not quantized
    short = dataclasses.replace(s, max_length=4)
    nf4 = dataclasses.replace(short, base=dataclasses.replace(short.base, quantization="nf4", double_quant=True))
    ckpt = dataclasses.replace(short, base=dataclasses.replace(short.base, gradient_checkpointing=True))
    assert total(nf4) < total(ckpt)
    with pytest.raises(ConfigError, match="nothing fits"):
        choose(short, (total(nf4) + total(ckpt)) // 2)


def test_the_chosen_settings_reach_the_run(sft_file, tmp_path, capsys):  # noqa: F811
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "2", "--memory", "600KiB"))
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("[lit_ft] memory 600KiB"))
    assert re.search(r"micro-batch 4 -> [12], accumulate_grad_batches x[24]( \+ gradient checkpointing)? -> .* of 600.00 KiB", line), line
    import lightning as L

    from lit_ft import InstructionDataModule, SFTModule
    from lit_ft.plan.auto import fit_memory

    model = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4, alpha=8))
    data = InstructionDataModule(train_file=sft_file, val_split=0, max_length=48, batch_size=4, tokenizer=BASE)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    said = []
    fit_memory(model, data, trainer, "600KiB", say=said.append)
    assert said[0] == line.removeprefix("[lit_ft] ")
    assert data.batch_size * trainer.accumulate_grad_batches == 4 and data.batch_size < 4
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and next(iter(trainer.train_dataloader))["input_ids"].shape[0] == data.batch_size


def test_an_impossible_budget_is_one_error_line_before_any_weights(sft_file, tmp_path, capsys):  # noqa: F811
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--memory", "10KiB"),
                   "memory: nothing fits 10.00 KiB", "give a budget of at least")
    assert not list((tmp_path / "runs").glob("version_*"))  # no empty run left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU case")
def test_auto_without_a_gpu_leaves_the_run_alone(sft_file, tmp_path, capsys):  # noqa: F811
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", "--memory", "auto"))
    assert "memory auto: no GPU on this machine" in capsys.readouterr().err


def test_auto_is_the_default_and_acts_only_where_the_run_does_not_fit(sft_file, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    """Without `--memory`, a fit on a GPU plans for the GPU's free memory (here a stand-in of 600 KiB free): it
    splits the micro-batch as `--memory auto` does; with room to spare it leaves the run alone and says so; without a
    GPU it says nothing; `--memory off` skips the plan; a budget nothing meets is refused, naming the way out."""
    from lit_ft.plan import auto
    from lit_ft.plan.sizes import parse_size

    free = {"auto": "600KiB"}
    real = auto.budget_of
    monkeypatch.setattr(auto, "budget_of", lambda memory: parse_size(free[memory]) if memory in free else real(memory))
    main(fit_args(sft_file, tmp_path / "a", "--trainer.max_steps", "1"))
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("[lit_ft] memory"))
    assert re.match(r"\[lit_ft\] memory auto: micro-batch 4 -> [12], accumulate_grad_batches x[24]( \+ gradient checkpointing)? -> ", line), line
    free["auto"] = "80GiB"
    main(fit_args(sft_file, tmp_path / "b", "--trainer.max_steps", "1"))
    assert "[lit_ft] memory auto: the run fits as configured" in capsys.readouterr().err
    main(fit_args(sft_file, tmp_path / "c", "--trainer.max_steps", "1", "--memory", "off"))
    assert "memory" not in capsys.readouterr().err
    free["auto"] = "10KiB"
    one_error_line(capsys, fit_args(sft_file, tmp_path / "d"), "memory: nothing fits 10.00 KiB",
                   "--memory off runs it as configured")
    monkeypatch.setattr(auto, "budget_of", real)
    if not torch.cuda.is_available():
        main(fit_args(sft_file, tmp_path / "e", "--trainer.max_steps", "1"))
        assert "memory" not in capsys.readouterr().err  # the default says nothing where there is nothing to plan


def test_auto_plans_for_the_share_of_the_card_the_process_may_use(monkeypatch):
    """`auto` is the GPU's free memory, and no more than what `torch.cuda.set_per_process_memory_fraction` leaves
    the process (the allocator refuses past it, whatever the card has free)."""
    from lit_ft.plan import auto

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 10**9)
    monkeypatch.setattr(torch.cuda.memory, "get_per_process_memory_fraction", lambda *a: 1.0, raising=False)
    assert auto.budget_of("auto") == 70 * 10**9
    monkeypatch.setattr(torch.cuda.memory, "get_per_process_memory_fraction", lambda *a: 0.3, raising=False)
    assert auto.budget_of("auto") == 23 * 10**9  # 0.3 x 80 GB, less the 1 GB already reserved


def test_the_default_runs_a_module_it_cannot_plan_as_configured(monkeypatch):
    """A LightningModule of the user's own has no plan: the default runs it as configured, in one line; an explicit
    `--memory` stops at the same point with the planner's error."""
    import lightning as L

    from lit_ft.plan import auto

    monkeypatch.setattr(auto, "budget_of", lambda memory: 2**30)
    said = []
    auto.fit_memory(L.LightningModule(), None, None, "auto", say=said.append, asked=False)
    assert len(said) == 1 and said[0].startswith("memory auto: no plan for this run (ConfigError: model: no memory "
                                                 "plan for LightningModule")
    with pytest.raises(ConfigError, match="no memory plan for LightningModule"):
        auto.fit_memory(L.LightningModule(), None, None, "auto", say=said.append, asked=True)


def test_the_micro_batch_lever_keeps_two_rows_for_kto():
    """KTO's KL estimate pairs each prompt with another row of its micro-batch (`data.batch_size` >= 2): the
    micro-batch lever stops at 2 there, at 1 elsewhere."""
    from lit_ft.plan import memory

    def smallest(stage):
        s = dataclasses.replace(settings(batch_size=8), stage=stage)
        return min(c.batch_size for _, _, c, kind in memory.levers(s) if kind == "microbatch")

    assert smallest("kto") == 2 and smallest("sft") == 1
    assert not [c for *_, c, kind in memory.levers(dataclasses.replace(settings(batch_size=2), stage="kto"))
                if kind == "microbatch"]


def test_a_validation_batch_that_sets_the_peak_is_shrunk_not_the_training(tiny_model_dir):
    """KTO with a held-out batch of 400 examples: its no-grad passes set the peak. At a budget the training alone
    fits, `auto` halves the validation batch (kept even: a held-out pair's two examples meet in one batch) and
    leaves the training's micro-batch, checkpointing and chunk alone."""
    from tests.test_plan import kto_settings

    s = kto_settings(tiny_model_dir, eval_batch_size=400)
    small = dataclasses.replace(s, eval_batch_size=100)
    assert total(small) < total(s)
    chosen, whats, args = choose(s, total(small))
    assert chosen.eval_batch_size in (100, 200) and chosen.eval_batch_size % 2 == 0, whats
    assert (chosen.batch_size, chosen.base, chosen.loss_chunk_size) == (s.batch_size, s.base, s.loss_chunk_size)
    assert args == ["--data.eval_batch_size", str(chosen.eval_batch_size)]


def test_compiling_is_chosen_where_the_run_pays_for_it():
    """Compiled decoder layers are a step-time lever, not a memory one: on a GPU, where the module left `compile` to
    the plan, `auto` turns it on when the run is long enough that the faster steps (COMPILED_HOST of the host's work,
    COMPILED_GPU of the GPU's) pay back the compiling (COMPILE_SECONDS), and not otherwise: a run a few steps short
    of the break-even, a run of unknown length, a module that set `compile: false` (or has no such setting), a CPU
    run, a 4-bit base (bitsandbytes' kernels: not measured compiled)."""
    from lit_ft.plan import auto

    s = settings(target="cuda", compile_auto=True)
    eager = auto.step_seconds(s)
    long = 10**9  # steps: the compiled step alone, its compiling spread to nothing
    compiled = auto.step_seconds(dataclasses.replace(s, compile=True, steps=long)) - auto.COMPILE_SECONDS / long
    assert compiled == pytest.approx(eager * max(auto.COMPILED_HOST, auto.COMPILED_GPU), rel=0.3)
    even = auto.COMPILE_SECONDS / (eager - compiled)  # steps where compiling has paid for itself
    budget = 80 * 2**30
    chosen, whats, args = choose(dataclasses.replace(s, steps=int(even * 1.1)), budget)
    assert chosen.compile and whats == ["compiled decoder layers"] and args == ["--model.compile", "true"]
    for no in (dataclasses.replace(s, steps=int(even * 0.9)), dataclasses.replace(s, steps=None),
               dataclasses.replace(s, steps=10**6, compile_auto=False),
               dataclasses.replace(s, steps=10**6, target="cpu"),
               dataclasses.replace(s, steps=10**6, base=dataclasses.replace(s.base, quantization="nf4"))):
        assert not choose(no, budget)[0].compile, no
    # it does not count as spending memory: a budget the run only just fits still gets it
    tight = dataclasses.replace(s, steps=10**6)
    assert choose(tight, total(tight))[0].compile


def test_the_step_model_counts_the_reference_pass_and_overlaps_host_and_gpu(monkeypatch):
    """`step_seconds` on a GPU: the slower of the host's queueing (a fixed time a layer and micro-batch) and the GPU's
    matmuls, not their sum (the card computes while the host queues); on a CPU their sum. DPO's step carries the
    reference model's no-grad forward (2N a token against the policy's 4N), which precomputing it or a
    reference-free loss removes; checkpointing recomputes the decoder, not the LM head, at little host work for eager
    layers (reentrant) and more for compiled ones (non-reentrant)."""
    from lit_ft.plan import auto
    from lit_ft.plan.stages import counted_model
    from lit_ft.stages.dpo import DPOSpec

    s = dataclasses.replace(settings(target="cuda", batch_size=4), stage="dpo", dpo=DPOSpec())
    monkeypatch.setattr(auto, "attention_flops", lambda *a: 0.0)  # (the matmuls alone: attention has its own test)
    rates = dict(auto.RATES["cuda"], layer_gpu_s=0.0)  # (the GPU's floor of small kernels: its own test)
    monkeypatch.setitem(auto.RATES, "cuda", dict(rates, layer_s=0.0, step_s=0.0))  # the GPU's time alone
    gpu = auto.step_seconds(s)
    assert auto.step_seconds(dataclasses.replace(s, dpo=DPOSpec(precompute_ref=True))) == pytest.approx(gpu * 4 / 6)
    assert auto.step_seconds(dataclasses.replace(s, dpo=DPOSpec(loss_type="simpo"))) == pytest.approx(gpu * 4 / 6)
    d = counted_model(s)[0]
    trunk_share = 1 - d.hidden * d.vocab / (gpu * rates["flops"] / (6 * 2 * s.batch_size * s.max_length))
    ckpt = dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=True))
    assert auto.step_seconds(ckpt) == pytest.approx(gpu * (6 + 2 * trunk_share) / 6)
    monkeypatch.setitem(auto.RATES, "cuda", dict(rates, flops=float("inf")))  # the host's time alone
    host = auto.step_seconds(s)
    assert host > 0 and gpu > 0
    monkeypatch.setitem(auto.RATES, "cuda", dict(rates, layer_s=rates["layer_s"] * gpu / host,
                                                 step_s=rates["step_s"] * gpu / host))  # both take as long
    assert auto.step_seconds(s) == pytest.approx(gpu)
    monkeypatch.setitem(auto.RATES, "cpu", auto.RATES["cuda"])
    assert auto.step_seconds(dataclasses.replace(s, target="cpu")) == pytest.approx(2 * gpu)
    # the host's work of recomputing: small for eager layers (reentrant), larger for compiled ones (non-reentrant)
    monkeypatch.setitem(auto.RATES, "cuda", dict(rates, flops=float("inf"), step_s=0.0))
    plain = dataclasses.replace(s, dpo=DPOSpec(precompute_ref=True))
    checked = dataclasses.replace(plain, base=dataclasses.replace(plain.base, gradient_checkpointing=True))
    assert auto.step_seconds(checked) == pytest.approx(auto.step_seconds(plain) * (1 + auto.RECOMPUTE_HOST))

    def compiled(x, long=10**9):  # the compiled step alone, its compiling spread to nothing
        return auto.step_seconds(dataclasses.replace(x, compile=True, steps=long)) - auto.COMPILE_SECONDS / long

    assert compiled(plain) == pytest.approx(auto.step_seconds(plain) * auto.COMPILED_HOST)
    assert compiled(checked) == pytest.approx(compiled(plain) * (1 + auto.RECOMPUTE_HOST_COMPILED))
    grouped = dataclasses.replace(checked, process_group=True)  # DDP, FSDP: non-reentrant eager layers too
    assert auto.step_seconds(grouped) == pytest.approx(auto.step_seconds(plain) * (1 + auto.RECOMPUTE_HOST_COMPILED))


def test_captured_steps_are_chosen_where_they_can_be_captured_and_leave_the_gpu_s_time(monkeypatch, tmp_path):
    """SFT's `cuda_graphs`, where the module left it to the plan: the host's work a step becomes its framework's and
    one replay's a micro-batch (`GRAPH_HOST_S`), the step the slower of that and the GPU's time, which on a small
    model is its floor of small kernels (`layer_gpu_s` a layer and micro-batch, a third more for what checkpointing
    recomputes); chosen on a GPU for one process and unpacked rows, never with compiled layers, a 4-bit base, a CPU,
    packed rows, several ranks or a module that set it; planned at its 64-token buckets with every position through
    the head (more loss memory than the gathered trained tokens)."""
    from lit_ft.plan import auto

    s = settings(target="cuda", cuda_graphs_auto=True, compile_auto=True, steps=10**6)
    graphs = dataclasses.replace(s, cuda_graphs=True)
    rates = auto.RATES["cuda"]
    d_layers = 2  # the tiny Llama's
    floor = d_layers * rates["layer_gpu_s"]
    assert auto.step_seconds(graphs) == pytest.approx(max(rates["step_s"] + auto.GRAPH_HOST_S, floor), rel=0.05)
    assert auto.step_seconds(graphs) < auto.step_seconds(s)
    monkeypatch.setitem(auto.RATES, "cuda", dict(rates, step_s=0.0, layer_s=0.0, flops=float("inf")))
    ckpt = dataclasses.replace(graphs, base=dataclasses.replace(s.base, gradient_checkpointing=True))
    assert auto.step_seconds(graphs) == pytest.approx(floor, rel=0.05)
    assert auto.step_seconds(ckpt) == pytest.approx(floor * 4 / 3, rel=0.05)
    monkeypatch.undo()
    budget = 80 * 2**30
    chosen, whats, args = choose(s, budget)
    assert chosen.cuda_graphs and not chosen.compile and whats == ["CUDA graphs"]
    assert args == ["--model.cuda_graphs", "true"]
    for no in (dataclasses.replace(s, cuda_graphs_auto=False), dataclasses.replace(s, target="cpu"),
               dataclasses.replace(s, packing=True), dataclasses.replace(s, ranks=2),
               dataclasses.replace(s, process_group=True),
               dataclasses.replace(s, base=dataclasses.replace(s.base, quantization="nf4")),
               dataclasses.replace(s, compile=True, compile_auto=False), dataclasses.replace(s, precision="16-mixed"),
               dataclasses.replace(s, base=dataclasses.replace(s.base, activation_offloading=True))):
        assert not choose(no, budget)[0].cuda_graphs, no
    # a mixture-of-experts base routes by the tokens' values: never captured
    from transformers import Qwen2MoeConfig

    moe = tmp_path / "config.json"
    Qwen2MoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=400, num_experts=4, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32).to_json_file(moe)
    moe_s = dataclasses.replace(s, base=dataclasses.replace(s.base, name_or_path=str(moe)))
    assert not choose(moe_s, budget)[0].cuda_graphs
    # a speed lever whose memory the plan counts (as compiling): a budget the captured run just fits gets it
    assert choose(s, total(graphs))[0].cuda_graphs
    # memory: the rows at their bucket's length, the loss over every position
    plain = estimate_settings(s, budget=None, advise=False)
    captured = estimate_settings(graphs, budget=None, advise=False)
    assert captured.peak > plain.peak
    assert "CUDA graphs (64-token buckets)" in captured.table() and "x 64 tokens" in captured.table()


@pytest.mark.parametrize("stage", ["ppo", "grpo", "distill"])
def test_online_stages_compile_their_update_where_the_rollouts_pay_for_it(stage, tmp_path, tiny_model_dir):
    """PPO, GRPO and distillation leave `compile` to `auto` by default: a training step is a rollout and its update,
    the update's passes run COMPILED_UPDATE of the eager time once compiled and the compiling costs
    COMPILE_SECONDS_ONLINE once, so a run of enough rollouts compiles and one a little short of the break-even does
    not. The rollouts come from `max_epochs` of the prompt batches read, or from `max_steps` (optimizer steps, under
    manual optimization) over the optimizer steps of one rollout's update: an optimizer step a
    `gradient_accumulation_steps` minibatches, and one for what is left at the end of a pass."""
    import json

    import lightning as L

    from lit_ft.data.modules import PromptDataModule
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.plan import auto
    from lit_ft.plan.memory import settings_from
    from lit_ft.stages.distill import DistillModule
    from lit_ft.stages.distill_spec import DistillSpec
    from lit_ft.stages.grpo import GRPOModule
    from lit_ft.stages.grpo_spec import GRPOSpec
    from lit_ft.stages.ppo import PPOModule
    from lit_ft.stages.ppo_spec import PPOSpec

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?"}) + "\n" for i in range(40)))
    dm = PromptDataModule(train_file=str(prompts), tokenizer=tiny_model_dir, max_length=32, batch_size=4,
                          answer_field=None, val_split=0)
    common = dict(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4), sampling=SamplingSpec(max_new_tokens=8))
    reward = dict(reward_fn="lit_ft.data.tasks.correctness_reward")
    if stage == "ppo":  # 4 prompts x 2 samples = 8 rows: minibatches of 3, 3 and 2; 2 accumulated: 2 optimizer
        # steps a pass, 3 epochs; the value adapter's pass beside the policy's
        module = PPOModule(ppo=PPOSpec(samples_per_prompt=2, mini_batch_size=3, ppo_epochs=3,
                                       gradient_accumulation_steps=2), **common, **reward)
        per_rollout, passes, one = 6, 3 * 2, {"ppo_epochs": 1}
    elif stage == "grpo":  # 4 prompts x 4 samples = 16 rows: 4 minibatches of 4, one iteration, a step each
        module = GRPOModule(grpo=GRPOSpec(samples_per_prompt=4, mini_batch_size=4), **common, **reward)
        per_rollout, passes, one = 4, 1, {"num_iterations": 1}
    else:  # 4 prompts, one response each: 2 minibatches of 2, both in one optimizer step
        module = DistillModule(teacher=ModelSpec(name_or_path=tiny_model_dir), **common,
                               distill=DistillSpec(mini_batch_size=2, gradient_accumulation_steps=4))
        per_rollout, passes, one = 1, 1, {}

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)

    assert settings_from(module, dm, trainer(max_epochs=2)).steps == 2 * 10  # 40 prompts, 4 a rollout
    assert settings_from(module, dm, trainer(max_epochs=1, limit_train_batches=3)).steps == 3
    assert settings_from(module, dm, trainer(max_steps=12 * per_rollout)).steps == 12
    s = dataclasses.replace(settings_from(module, dm, trainer(max_epochs=1)), target="cuda")
    assert s.compile_auto and not s.compile
    once = dataclasses.replace(s, base=dataclasses.replace(s.base, gradient_checkpointing=False))
    eager = auto.step_seconds(once)
    single = dataclasses.replace(once, **{stage: dataclasses.replace(getattr(s, stage), **one)},
                                 value_model="shared_trunk")
    assert eager == pytest.approx(passes * auto.step_seconds(single))
    even = auto.COMPILE_SECONDS_ONLINE / ((1 - auto.COMPILED_UPDATE) * eager)  # rollouts that pay back compiling
    budget = 80 * 2**30
    long = dataclasses.replace(s, steps=int(even * 1.1))
    chosen, whats, args = choose(long, budget)
    assert chosen.compile and whats == ["compiled decoder layers"] and args == ["--model.compile", "true"]
    assert not choose(dataclasses.replace(s, steps=int(even * 0.9)), budget)[0].compile
    assert not choose(dataclasses.replace(s, steps=10**6, target="cpu"), budget)[0].compile
    auto.apply(module, dm, trainer(), long, chosen)
    assert module.compile_layers is True and module.hparams["compile"] is True and module.compile_planned is True


def test_the_plan_reads_the_run_length_and_sets_compile_on_the_module(sft_file):  # noqa: F811
    """`Settings.steps`: `max_steps`, else the epochs of the training rows read (micro-batches over accumulation,
    `limit_train_batches` applied); `compile: null` (the default) leaves it to the plan, `false` does not; what the
    plan chose reaches the module and its saved hyperparameters."""
    import lightning as L

    from lit_ft import InstructionDataModule, SFTModule
    from lit_ft.plan import auto
    from lit_ft.plan.memory import settings_from

    data = InstructionDataModule(train_file=sft_file, val_split=0, max_length=48, batch_size=4, tokenizer=BASE)
    rows = sum(1 for line in open(sft_file) if line.strip())

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)

    model = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4, alpha=8))
    assert settings_from(model, data, trainer(max_steps=7)).steps == 7
    s = settings_from(model, data, trainer(max_epochs=3, accumulate_grad_batches=2))
    assert s.data.train_count == rows and s.steps == 3 * (-(-rows // 4) // 2)
    assert settings_from(model, data, trainer(max_epochs=2, limit_train_batches=1)).steps == 2
    ddp = settings_from(model, data, trainer(max_epochs=3, accumulate_grad_batches=2, devices=2, strategy="ddp"))
    assert (ddp.ranks, ddp.process_group, s.ranks, s.process_group) == (2, True, 1, False)
    assert ddp.steps == 3 * (-(-rows // 8) // 2)  # each of the two ranks reads half the rows
    assert s.compile_auto and not s.compile
    assert not settings_from(SFTModule(base=ModelSpec(name_or_path=BASE), compile=False), data, trainer()).compile_auto
    chosen = dataclasses.replace(s, compile=True)
    auto.apply(model, data, trainer(), s, chosen)
    assert model.compile_layers is True and model.hparams["compile"] is True and model.compile_planned is True


def test_a_resumed_fit_plans_for_the_budget_of_its_first_fit(sft_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Preempted and resumed (`--ckpt_path last`) on a card with more memory free: `auto` plans for the budget the
    first fit planned for (kept in the run directory), so the micro-batch stays what the checkpoint counted and the
    run ends on the steps it would have run; a fresh fit on the roomy card folds the micro-batches back."""
    import json

    from lit_ft.plan import auto
    from lit_ft.plan.sizes import parse_size
    from tests.test_hostile import CKPT_EVERY_2

    free = {"auto": "600KiB"}
    real = auto.budget_of
    monkeypatch.setattr(auto, "budget_of", lambda memory: parse_size(free[memory]) if memory in free else real(memory))
    root = tmp_path / "runs"
    main(fit_args(sft_file, root, "--trainer.max_steps", "2", *CKPT_EVERY_2))
    first = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("[lit_ft] memory auto:"))
    micro = re.search(r"micro-batch 4 -> (\d+)", first)
    assert micro, first
    assert json.loads((root / "version_0" / auto.RECORD).read_text())["budget"] == parse_size("600KiB")
    free["auto"] = "80GiB"
    main(fit_args(sft_file, root, "--trainer.max_steps", "4", *CKPT_EVERY_2, "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert "a resumed fit, planned for the budget of its first fit (600.00 KiB" in err
    assert f"micro-batch 4 -> {micro.group(1)}," in err
    last = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    main(fit_args(sft_file, tmp_path / "fresh", "--trainer.max_steps", "1"))
    assert "[lit_ft] memory auto: the run fits as configured" in capsys.readouterr().err


def test_a_damaged_plan_record_is_one_error_line_naming_it(sft_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """`memory_plan.json` overwritten with something else: the resumed fit stops with one line naming the file and
    the way out, not a JSON traceback."""
    from lit_ft.plan import auto
    from lit_ft.plan.sizes import parse_size
    from tests.test_hostile import CKPT_EVERY_2

    monkeypatch.setattr(auto, "budget_of", lambda memory: parse_size("80GiB") if memory == "auto" else None)
    root = tmp_path / "runs"
    main(fit_args(sft_file, root, "--trainer.max_steps", "2", *CKPT_EVERY_2))
    (root / "version_0" / auto.RECORD).write_text("{not json")
    one_error_line(capsys, fit_args(sft_file, root, "--trainer.max_steps", "4", *CKPT_EVERY_2, "--ckpt_path", "last"),
                   auto.RECORD, "delete it to plan for the memory free now")
