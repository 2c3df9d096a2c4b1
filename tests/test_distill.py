"""On-policy distillation (GKD): the generalised JSD against independent computations, and DistillModule on a tiny
random Llama: settings, the teacher's vocabulary, which weights train, learning against the start, the supervised
steps, resume and export."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.errors import ConfigError
from lit_ft.losses import chunked_generalized_jsd, generalized_jsd
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.distill import DistillModule
from lit_ft.stages.distill_spec import DistillSpec
from lit_ft.train.optim import OptimSpec
from tests.test_ppo import MAX_NEW, adapters, one_thread, params, prompt_loader, tokenizer, trainer  # noqa: F401


# ---------------------------------------------------------------------------------------------- the loss


def reference_jsd(s_logits, t_logits, beta, temperature):
    """An explicit loop over rows and vocabulary entries in float64 (torch.distributions for the two KLs)."""
    from torch.distributions import Categorical, kl_divergence

    out = []
    for s_row, t_row in zip(s_logits.double(), t_logits.double()):
        S, T = (s_row / temperature).softmax(-1), (t_row / temperature).softmax(-1)
        if beta == 0:
            out.append(kl_divergence(Categorical(probs=T), Categorical(probs=S)))
            continue
        if beta == 1:
            out.append(kl_divergence(Categorical(probs=S), Categorical(probs=T)))
            continue
        total = 0.0
        for v in range(len(S)):
            m = (1 - beta) * S[v] + beta * T[v]
            total += beta * T[v] * math.log(T[v] / m) + (1 - beta) * S[v] * math.log(S[v] / m)
        out.append(torch.as_tensor(total, dtype=torch.float64))
    return torch.stack(out)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_against_a_loop(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    got = generalized_jsd(s, t, beta, temperature)
    torch.testing.assert_close(got.double(), reference_jsd(s, t, beta, temperature), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()
    torch.testing.assert_close(generalized_jsd(s, s, beta, temperature), torch.zeros(6), atol=1e-6, rtol=0)


def test_half_jsd_is_symmetric_and_bounded():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))
    assert (generalized_jsd(s, t, 0.5) <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunks_give_the_whole_and_gradients_reach_the_student_only(beta):
    g = torch.Generator().manual_seed(1)
    w_s, w_t = torch.randn(11, 4, generator=g, requires_grad=True), torch.randn(11, 3, generator=g, requires_grad=True)
    h_s, h_t = torch.randn(9, 4, generator=g, requires_grad=True), torch.randn(9, 3, generator=g, requires_grad=True)
    whole = generalized_jsd(h_s @ w_s.T, h_t @ w_t.T, beta, 0.8)
    grads_whole = torch.autograd.grad(whole.sum(), [h_s, w_s])
    jsd, kl, lp = chunked_generalized_jsd(h_s, h_t, lambda h: h @ w_s.T, lambda h: h @ w_t.T, beta, 0.8,
                                          chunk_size=2)
    assert lp is None
    torch.testing.assert_close(jsd, whole)
    torch.testing.assert_close(kl, generalized_jsd(h_s @ w_s.T, h_t @ w_t.T, 1.0, 0.8).detach())
    assert not kl.requires_grad
    jsd.sum().backward()
    torch.testing.assert_close(h_s.grad, grads_whole[0])
    torch.testing.assert_close(w_s.grad, grads_whole[1])
    assert h_t.grad is None and w_t.grad is None  # the teacher is never differentiated


def test_the_targets_log_probs_come_from_the_loss_logits_and_change_nothing_else():
    """`targets`: each token's log-prob under the student's whole head (also past `width`, the entries the divergence
    compares) at `target_temperature`, against an explicit log_softmax; the divergence and its gradients are those
    without targets, and the backward's recomputation of a chunk adds no log-probs."""
    g = torch.Generator().manual_seed(2)
    w_s, w_t = torch.randn(13, 4, generator=g), torch.randn(11, 3, generator=g)
    h_s, h_t = torch.randn(9, 4, generator=g, requires_grad=True), torch.randn(9, 3, generator=g)
    tok = torch.randint(0, 13, (9,), generator=g)
    calls = []

    def student(h):
        calls.append(len(h))
        return h @ w_s.T

    jsd, kl, lp = chunked_generalized_jsd(h_s, h_t, student, lambda h: h @ w_t.T, 0.5, 0.8, chunk_size=4, width=11,
                                          targets=tok, target_temperature=0.7)
    want = torch.log_softmax((h_s @ w_s.T).detach() / 0.7, -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want)
    assert not lp.requires_grad and calls == [4, 4, 1]  # one head pass a chunk for both
    torch.testing.assert_close(jsd, generalized_jsd((h_s @ w_s.T)[:, :11], h_t @ w_t.T, 0.5, 0.8))
    grad = torch.autograd.grad(jsd.sum(), h_s)[0]
    plain = chunked_generalized_jsd(h_s, h_t, lambda h: (h @ w_s.T)[:, :11], lambda h: h @ w_t.T, 0.5, 0.8,
                                    chunk_size=4)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(plain.sum(), h_s)[0])
    assert len(lp) == 9  # the recomputed chunks of the backward appended nothing
    empty = chunked_generalized_jsd(h_s[:0], h_t[:0], student, lambda h: h @ w_t.T, 0.5, targets=tok[:0])
    assert all(len(x) == 0 for x in empty)


# ---------------------------------------------------------------------------------------------- settings


def make_module(model_dir, teacher_adapter=None, distill=None, lr=1e-3, **kw):
    kw.setdefault("lora", LoraSpec(r=8, alpha=16, dropout=0.0))
    return DistillModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), teacher_adapter=teacher_adapter,
                         sampling=SamplingSpec(max_new_tokens=MAX_NEW), distill=distill or DistillSpec(mini_batch_size=8),
                         optim=OptimSpec(lr=lr, scheduler="constant", warmup_ratio=0.0), sample_table_every=0, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"beta": 1.5}, "model.distill.beta=1.5: expected a number in [0, 1]"),
    ({"beta": -0.1}, "model.distill.beta=-0.1: expected a number in [0, 1]"),
    ({"lmbda": 2.0}, "model.distill.lmbda=2.0: expected a number in [0, 1]"),
    ({"temperature": 0.0}, "model.distill.temperature=0.0: expected a number > 0"),
    ({"logits_chunk_size": 0}, "model.distill.logits_chunk_size=0: expected an integer >= 1"),
    ({"mini_batch_size": 0}, "model.distill.mini_batch_size=0: expected an integer >= 1"),
])
def test_bad_settings_name_the_key(kw, message):
    with pytest.raises(ConfigError) as info:
        DistillSpec(**kw)
    assert message in str(info.value)


def test_exactly_one_teacher(tiny_model_dir, adapters):
    with pytest.raises(ConfigError, match=r"model.teacher=None, model.teacher_adapter=None: set exactly one"):
        make_module(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"set exactly one"):
        make_module(tiny_model_dir, teacher_adapter=adapters[0], teacher=ModelSpec(name_or_path=tiny_model_dir))


def test_prompts_without_responses_need_lmbda_1(tiny_model_dir, tokenizer, adapters):
    module = make_module(tiny_model_dir, adapters[0], DistillSpec(mini_batch_size=8, lmbda=0.0))
    with pytest.raises(ConfigError, match=r"^model.distill.lmbda=0.0: the steps off the student's samples train on "
                                          r"the data's own responses, but the training prompts carry none"):
        trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))


def test_a_teacher_of_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from tests.conftest import make_tiny_llama
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    make_tiny_llama(str(other), vocab_size=len(tok))
    module = make_module(tiny_model_dir, teacher=ModelSpec(name_or_path=str(other), dtype="float32"))
    with pytest.raises(ConfigError) as info:
        module.configure_model()
    msg = str(info.value)
    assert msg.startswith(f"model.teacher: the teacher's tokenizer ({other}: {len(tok)} tokens")
    assert f"differs from the student's ({tiny_model_dir}: {len(tok) - 2} tokens" in msg


# ---------------------------------------------------------------------------------------------- training


def held_out(module, tokenizer):
    """The divergence's token mean on fixed sampled responses of the held-out prompts (the same tokens before and
    after: sampled once from the start)."""
    torch.manual_seed(123)
    ro = module.rollout(next(iter(prompt_loader(tokenizer, batch_size=16, seed=7))), module.sampling)
    return ro


@torch.no_grad()
def divergence(module, ro):
    module.teacher_pass(ro)
    per_row, kl, per_token, _ = module.divergence(ro)
    return float((per_token.sum() / ro.mask.sum())), float((kl * ro.mask.sum(1)).sum() / ro.mask.sum())


def test_only_the_student_trains_and_metrics(tiny_model_dir, tokenizer, adapters):
    module = make_module(tiny_model_dir, adapters[0])
    module.configure_model()
    assert sorted(module.model.peft_config) == ["policy", "teacher"]
    before = params(module, "lora_", "embed_tokens", "base_layer")
    trainer(2).fit(module, train_dataloaders=prompt_loader(tokenizer))
    after = params(module, "lora_", "embed_tokens", "base_layer")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".policy." in n for n in changed), changed
    m = module.trainer.callback_metrics
    for k in ("train/loss", "train/teacher_student_kl", "train/completions/mean_length", "train/on_policy"):
        assert k in m, k
    assert float(m["train/loss"]) > 0 and float(m["train/on_policy"]) == 1.0


def test_a_separate_teacher_model_trains_the_student(tiny_model_dir, tokenizer, tmp_path):
    from tests.conftest import make_tiny_llama
    from transformers import AutoTokenizer

    other = tmp_path / "teacher"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    make_tiny_llama(str(other), vocab_size=len(tokenizer), seed=5, hidden_size=48)  # a wider teacher
    module = make_module(tiny_model_dir, teacher=ModelSpec(name_or_path=str(other), dtype="float32"))
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    assert module.teacher_model is not None and not any(p.requires_grad for p in module.teacher_model.parameters())
    assert "teacher" not in "".join(module.state_dict())  # the teacher is no part of the module's state
    assert float(module.trainer.callback_metrics["train/loss"]) > 0


def test_the_student_moves_towards_the_teacher(tiny_model_dir, tokenizer, adapters):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir, adapters[0], DistillSpec(mini_batch_size=16, beta=0.5), lr=1e-2)
    module.configure_model()
    ro = held_out(module, tokenizer)
    start = divergence(module, ro)
    trainer(8).fit(module, train_dataloaders=prompt_loader(tokenizer, n=64))
    end = divergence(module, ro)
    print(f"held-out JSD(0.5) {start[0]:.4f} -> {end[0]:.4f}; KL(student||teacher) {start[1]:.4f} -> {end[1]:.4f}")
    assert end[0] < 0.5 * start[0] and end[1] < 0.5 * start[1]


def test_supervised_steps_use_the_batch_responses(tiny_model_dir, tokenizer, adapters):
    base = prompt_loader(tokenizer)

    def with_responses():
        for b in base:
            yield {**b, "completions": ["The answer is 42."] * len(b["prompts"])}

    module = make_module(tiny_model_dir, adapters[0], DistillSpec(mini_batch_size=8, lmbda=0.0))
    seen = []
    real = module.teacher_pass
    module.teacher_pass = lambda ro: seen.append(ro.responses.clone()) or real(ro)
    loader = torch.utils.data.DataLoader(list(with_responses()), batch_size=None)
    trainer(2).fit(module, train_dataloaders=loader)
    want = tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert seen and all(r[0, :len(want)].tolist() == want[:MAX_NEW] for r in seen)
    assert float(module.trainer.callback_metrics["train/on_policy"]) == 0.0


MISMATCH = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl_sampler_train")


@pytest.mark.parametrize("engine, mbs, ga", [("hf", 8, 1), ("static", 4, 2), ("hf", 4, 1)])
def test_rollout_mismatch_is_zero_in_fp32_from_the_loss_pass(tiny_model_dir, tokenizer, adapters, engine, mbs, ga):
    """fp32, eager, no merged copy: the sampler's log-probs of the student's tokens (transformers' generate, or the
    static engine run eagerly on the CPU) against the student's of the divergence's own forward (no other pass),
    through the shared `online.mismatch_stats`: equal up to float rounding (max |diff| < 1e-5), as PPO's and GRPO's.
    Over the first optimizer step's rows: all 8 (one minibatch; two accumulated), or the first 4 of two steps."""
    module = make_module(tiny_model_dir, adapters[0], DistillSpec(mini_batch_size=mbs, gradient_accumulation_steps=ga,
                                                                  temperature=0.9))
    module.sampling = SamplingSpec(max_new_tokens=MAX_NEW, temperature=0.8, engine=engine)
    passes = []
    module.configure_model()
    real = module.divergence
    module.divergence = lambda ro, **kw: passes.append(len(ro.mask)) or real(ro, **kw)
    seen = []
    real_mismatch = module.mismatch
    module.mismatch = lambda: seen.append(sum(len(x[2]) for x in module.on_policy_seen)) or real_mismatch()
    torch.manual_seed(0)
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert module.sampler.choice == engine and passes == [mbs] * (8 // mbs)  # the loss's passes, no other
    assert seen == [mbs * ga]
    assert float(m["rollout/logprob_diff_max"]) < 1e-5 and float(m["rollout/logprob_diff_mean"]) < 1e-6
    assert abs(float(m["rollout/kl_sampler_train"])) < 1e-4
    assert "rollout/correction_weight_mean" not in m


def test_rollout_mismatch_of_a_merged_bf16_copy_is_measured(tiny_model_dir, tokenizer, adapters):
    """A bf16 base with `sampling.merged`: the sampler decodes W + BA rounded to bf16, the student's loss pass runs
    W x + B(A x); the logged difference is bf16 rounding (measured mean 5.8e-5, max 9.8e-4), far above the fp32
    case's (max < 1e-5, mean < 1e-6). A step off the batch's own
    responses has no sampler log-probs and logs no rollout/ figures."""
    module = make_module(tiny_model_dir, adapters[0])
    module.base = ModelSpec(name_or_path=tiny_model_dir, dtype="bfloat16")
    module.sampling = SamplingSpec(max_new_tokens=MAX_NEW, merged=True)
    torch.manual_seed(0)
    trainer(1).fit(module, train_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert float(m["rollout/logprob_diff_max"]) > 5e-4 and float(m["rollout/logprob_diff_mean"]) > 2e-5
    module = make_module(tiny_model_dir, adapters[0], DistillSpec(mini_batch_size=8, lmbda=0.0))
    loader = [{**b, "completions": ["The answer is 42."] * len(b["prompts"])} for b in prompt_loader(tokenizer)]
    trainer(1).fit(module, train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    assert not any(k in module.trainer.callback_metrics for k in MISMATCH)


def test_validation_resume_and_export(tiny_model_dir, tokenizer, adapters, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = make_module(tiny_model_dir, adapters[0])
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(2, enable_checkpointing=True, callbacks=[ck], limit_val_batches=1).fit(
        module, train_dataloaders=prompt_loader(tokenizer), val_dataloaders=prompt_loader(tokenizer))
    m = module.trainer.callback_metrics
    assert float(m["val/loss"]) > 0 and "val/teacher_student_kl" in m and "val/completions/mean_length" in m
    resumed = make_module(tiny_model_dir, adapters[0])
    trainer(2, epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck2")], enable_checkpointing=True).fit(
        resumed, train_dataloaders=prompt_loader(tokenizer), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.counters["rollouts"] == 4 and resumed.trainer.global_step == 4  # 2 restored + 2 more
    out = resumed.save_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    state = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    mine = {n.replace(".policy.", ".default."): p for n, p in resumed.model.named_parameters() if ".policy." in n}
    assert state and all(torch.equal(state[n].float(), mine[n].float()) for n in state if n in mine)


def briefly_sft(tiny_model_dir, d, says: str, seed: int, **dims) -> str:
    """A tiny Llama of `dims` and the test tokenizer in `d`, fully fine-tuned (40 AdamW steps) to answer every test
    question with `says`: its head learns to put its mass on a few tokens (an untrained tiny Llama's frozen head,
    std 0.02 over a normalised hidden state, cannot express anything far from uniform)."""
    from tests.conftest import make_tiny_llama
    from tests.test_ppo import QUESTIONS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(d)
    model = make_tiny_llama(str(d), vocab_size=len(tok), seed=seed, **dims)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": says}],
                                     tokenize=False) for q in QUESTIONS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def larger_teacher_and_student(tiny_model_dir, tmp_path_factory):
    """(teacher, student) bases of one tokenizer: the teacher a DIFFERENT, larger tiny Llama (4 layers of hidden
    64) briefly SFT-trained to say one answer, the student a smaller one (2 layers of hidden 32) briefly trained to
    say another."""
    teacher = briefly_sft(tiny_model_dir, tmp_path_factory.mktemp("teacher"), "The answer is 42.", 11,
                          hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    student = briefly_sft(tiny_model_dir, tmp_path_factory.mktemp("student"), "I do not know that.", 12)
    return teacher, student


def test_a_smaller_student_learns_a_larger_separate_teacher(tokenizer, larger_teacher_and_student):
    """GKD with `teacher: ModelSpec`: a fresh LoRA on the smaller tiny model, a short fit, and the student's
    held-out divergence under the larger teacher (on the same fixed responses, sampled once at the start) falls
    measurably below its start (a fresh LoRA of a base that says another answer)."""
    torch.manual_seed(0)
    teacher_dir, student_dir = larger_teacher_and_student
    teacher = ModelSpec(name_or_path=teacher_dir, dtype="float32")
    module = make_module(student_dir, teacher=teacher, distill=DistillSpec(mini_batch_size=16, beta=0.5), lr=1e-2)
    module.configure_model()
    assert module.teacher_model.config.num_hidden_layers == 4 and module.teacher_model.config.hidden_size == 64
    ro = held_out(module, tokenizer)
    start = divergence(module, ro)
    trainer(8).fit(module, train_dataloaders=prompt_loader(tokenizer, n=64))
    end = divergence(module, ro)
    print(f"larger teacher: held-out JSD(0.5) {start[0]:.4f} -> {end[0]:.4f}; KL(student||teacher) "
          f"{start[1]:.4f} -> {end[1]:.4f}")
    assert start[0] > 0.05, "the teacher's distributions differ from the student's at the start"
    assert end[0] < 0.85 * start[0] and end[1] < 0.8 * start[1]  # 0.319 -> 0.245, 2.60 -> 1.76 at these seeds
