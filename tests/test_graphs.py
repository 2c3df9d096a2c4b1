"""`cuda_graphs`: a training step's forward and backward replayed from CUDA graphs (`lit_ft.train.graphs`).

On the CPU: what the captured step computes (no padding mask, every position through the head) equals the usual
step on right-padded rows; the gradient binding accumulates as `backward()` does; the settings that cannot be
captured are refused by name; a capture that fails leaves the run eager with one warning and the same result. On a
CUDA device: replays against the eager step (the weights' casts under autocast follow the weights; dropout masks
under reentrant checkpointing recomputed alike), and a fit with graphs against one without."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lit_ft.errors import ConfigError
from lit_ft.losses import causal_lm_loss
from lit_ft.models import LoraSpec, ModelSpec, build_model
from lit_ft.stages.sft import SFTModule
from lit_ft.train import graphs
from lit_ft.train.optim import OptimSpec
from tests.test_sft import _datamodule

CUDA = torch.cuda.is_available()


def test_pad_to_bucket_pads_each_named_tensor_on_the_right_with_its_value():
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long),
             "other": "kept"}
    out = graphs.pad_to_bucket(batch, {"input_ids": 0, "labels": -100, "attention_mask": 0}, multiple=4)
    assert out["input_ids"].shape == (2, 8) and out["other"] == "kept" and "attention_mask" not in out
    assert out["input_ids"][:, 5:].eq(0).all() and out["labels"][:, 5:].eq(-100).all()
    assert out["labels"][:, :5].eq(1).all()
    same = graphs.pad_to_bucket({"labels": torch.ones(2, 8)}, {"labels": -100}, multiple=4)
    assert same["labels"].shape == (2, 8)


def test_batches_a_captured_step_cannot_take_are_refused_or_run_eagerly(tiny_model_dir):
    """Left padding (the captured step leaves the padding mask out) and packed rows: asked for, `cuda_graphs` stops
    with the reason; chosen by the plan, the run goes on eagerly and says why."""
    right = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    left = dict(right, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    packed = dict(right, position_ids=torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]))
    assert graphs.right_padded(right["attention_mask"]) and not graphs.right_padded(left["attention_mask"])
    for batch, why in ((left, r"a batch's padding is not at the end of its rows \(left padding\?\)"),
                       (packed, r"packed batches \(data.packing\) cannot be captured")):
        module = _sft(tiny_model_dir, cuda_graphs=True)
        assert module._capturable(right)
        with pytest.raises(ConfigError, match=f"model.cuda_graphs: {why}"):
            module._capturable(batch)
        module = _sft(tiny_model_dir, cuda_graphs=True)
        module.graphs_planned = True  # (what `--memory auto` sets)
        assert not module._capturable(batch) and module.cuda_graphs is False


def test_the_loss_over_every_position_equals_the_gathered_loss():
    """`gather=False` (what a captured step computes) against the trained positions only, and both against the
    full logits' cross-entropy."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    ref = torch.nn.functional.cross_entropy((hidden[:, :-1] @ weight.t()).flatten(0, 1), labels[:, 1:].flatten(),
                                            reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for gather in (True, False):
        for frozen in (False, True):  # a trained head (checkpointed chunks) and a frozen one (the gradient in forward)
            w = weight.detach() if frozen else weight
            loss, n = causal_lm_loss(hidden, w, labels, chunk_size=5, gather=gather)
            assert int(n) == int((labels[:, 1:] != -100).sum())
            torch.testing.assert_close(loss, ref)
            grads = torch.autograd.grad(loss, (hidden,) if frozen else (hidden, weight))
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r)
    nothing = torch.full_like(labels, -100)
    loss, n = causal_lm_loss(hidden, weight, nothing, gather=False)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    assert all(float(g.abs().sum()) == 0.0 for g in torch.autograd.grad(loss, (hidden, weight)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _lora_model(model_dir: str, **base):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=model_dir, dtype="float32", **base), LoraSpec(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # PEFT starts B at zero: make the adapter matter, so its A gradients are compared too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_captured_step_computes_the_usual_loss_and_gradients_on_right_padded_rows(tiny_model_dir, tmp_path, attn):
    """No padding mask and every position through the head: exact for right padding (real tokens attend only to
    earlier, real tokens; padded positions carry label -100), with checkpointing on and off. Eager attention runs one
    algorithm with and without the mask (rounding alone); SDPA runs its causal kernel without it, which some torch
    builds' CPU kernels compute less exactly (2e-3 of the gradient measured with torch 2.11 on a 16-core host)."""
    dm = _datamodule(tmp_path, tiny_model_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].eq(0).any(), "the batch must hold padding for the comparison to mean something"
    padded = graphs.pad_to_bucket(batch, {"input_ids": 0, "attention_mask": 0, "labels": -100}, multiple=64)
    for checkpointing in (False, True):
        module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir, gradient_checkpointing=checkpointing,
                                          attn_implementation=attn), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
        module.configure_model()
        module.model.train()
        results = []
        for b, captured in ((batch, False), (padded, True)):
            module.model.zero_grad(set_to_none=True)
            loss, n = module.token_loss(b, captured=captured)
            loss.backward()
            results.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in module.model.named_parameters()
                                                    if p.grad is not None}))
        (l0, n0, g0), (l1, n1, g1) = results
        assert n0 == n1 and g0.keys() == g1.keys() and g0
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        for k in g0:  # (sums over other row counts: rounding, relative to the gradient's size)
            assert _rel(g1[k], g0[k]) < (1e-5 if attn == "eager" else 1e-2), k


def test_bound_gradients_accumulate_as_backward_does(tiny_model_dir):
    """The runner's eager path (every shape before its capture): gradients bound once, zeroed after
    `zero_grad(set_to_none=True)`, accumulated over micro-batches, a gradient made elsewhere copied in; parameters the
    objective does not reach keep no gradient."""
    model = _lora_model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    unused = torch.nn.Parameter(torch.ones(3))
    runner = graphs.CapturedGradients([*params, unused], warmup=10**9)
    torch.manual_seed(1)
    batches = [torch.randint(3, 100, (2, 9)) for _ in range(5)]

    def fn(b):
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss
        return loss * 0.5, loss

    def reference(micro):
        model.zero_grad(set_to_none=True)
        for x in micro:
            (model(input_ids=x, labels=x, use_cache=False).loss * 0.5).backward()
        return [p.grad.clone() for p in params]

    for micro in (batches[:2], batches[2:3], batches[3:]):
        expected = reference(micro)
        model.zero_grad(set_to_none=True)
        for x in micro:
            runner.run(fn, {"input_ids": x})
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e)
        assert unused.grad is None
    bound = [p.grad for p in params]
    model.zero_grad(set_to_none=True)
    params[0].grad = torch.ones_like(params[0])  # a gradient from elsewhere: copied into the bound tensor
    runner.run(fn, {"input_ids": batches[0]})
    assert all(p.grad is b for p, b in zip(params, bound))
    assert params[0].grad.ne(0).any()


def test_a_parameter_no_step_reached_before_is_zeroed_with_the_others():
    """The first run finds the parameters the objective reaches; one reached only later still starts each optimizer
    step from nothing (`fresh`), as `zero_grad(set_to_none=True)` leaves it, instead of adding up across steps."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    runner = graphs.CapturedGradients([a, b], warmup=10**9)
    use_b = [False]

    def fn(batch):
        loss = (a * batch["x"]).sum() + ((b * batch["x"]).sum() if use_b[0] else 0)
        return loss, loss

    x = torch.ones(2)
    runner.run(fn, {"x": x}, fresh=True)
    assert runner.others == [b]
    use_b[0] = True
    for _ in range(3):
        runner.run(fn, {"x": x}, fresh=True)
        assert b.grad.tolist() == [1.0, 1.0] and a.grad.tolist() == [1.0, 1.0]


def test_a_loss_scaler_is_refused():
    """`16-mixed` scales the loss Lightning hands to a backward the captured step does not run."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(world_size=1, precision="16-mixed", precision_plugin=SimpleNamespace(scaler=object()))
    module = SimpleNamespace(device=torch.device("cuda"), _trainer=trainer)
    with pytest.raises(ConfigError, match=r"model.cuda_graphs: not with a loss scaler \(trainer.precision 16-mixed\)"):
        graphs.check_capturable(module, "model.cuda_graphs")


def test_what_the_captured_step_cannot_serve_is_refused_or_left_eager_by_the_plan(tiny_model_dir, tmp_path):
    """NEFTune (its noise reads the padded length), activation offloading (it waits inside the backward) and a
    mixture-of-experts model (it routes tokens by their values): asked for, `cuda_graphs` stops with the reason;
    chosen by the plan, the run goes eager and says why."""
    from tests.conftest import make_tokenizer
    from tests.family_models import make_family_model

    moe = str(tmp_path / "moe")
    make_family_model("qwen2_moe", moe, len(make_tokenizer(moe)))
    for kw, why, model_dir in ((dict(neftune_alpha=5.0), "NEFTune", tiny_model_dir),
                               (dict(), "activation offloading", tiny_model_dir),
                               (dict(), "a mixture-of-experts model", moe)):
        base = ModelSpec(name_or_path=model_dir, activation_offloading=why == "activation offloading")
        module = SFTModule(base=base, lora=LoraSpec(r=4, alpha=8), cuda_graphs=True, **kw)
        with pytest.raises(ConfigError, match=f"model.cuda_graphs: {why}"):
            module.configure_model()
        module = SFTModule(base=base, lora=LoraSpec(r=4, alpha=8), cuda_graphs=None, **kw)
        module.cuda_graphs = module.graphs_planned = True  # (what `--memory auto` sets)
        module.configure_model()
        assert module.cuda_graphs is False


def _sft(model_dir: str, **kw) -> SFTModule:
    return SFTModule(base=ModelSpec(name_or_path=model_dir, gradient_checkpointing=True),
                     lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                     optim=OptimSpec(lr=1e-2, warmup_ratio=0.0, scheduler="constant"), **kw)


def _fit(module, tmp_path, model_dir, steps: int, accelerator: str = "cpu", **trainer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dm = _datamodule(tmp_path, model_dir)
    L.seed_everything(0, verbose=False)  # the same LoRA start and batch order for the runs compared
    trainer = {"limit_val_batches": 0, **trainer}
    L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path), **trainer).fit(module, datamodule=dm)
    return {k: v.detach().cpu().clone() for k, v in module.model.named_parameters() if v.requires_grad}


def test_settings_a_graph_cannot_capture_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.cuda_graphs and model.compile: choose one"):
        _sft(tiny_model_dir, cuda_graphs=True, compile=True)
    if not CUDA:
        with pytest.raises(ConfigError, match=r"model.cuda_graphs: needs a CUDA device \(the module is on cpu\)"):
            _fit(_sft(tiny_model_dir, cuda_graphs=True), tmp_path, tiny_model_dir, 1)


def test_a_copy_of_the_module_leaves_its_graphs_behind(tiny_model_dir):
    """CUDA graphs belong to the process and device that captured them: a pickled or deep-copied module (a callback's
    averaged copy, a spawned worker) starts without them and captures its own."""
    import copy
    import pickle

    module = _sft(tiny_model_dir, cuda_graphs=True)
    module._graphs = graphs.CapturedGradients([])
    module._graphs.unpicklable = lambda: None  # (what a CUDA graph is to pickle)
    assert pickle.loads(pickle.dumps(module))._graphs is None
    assert copy.deepcopy(module)._graphs is None and module._graphs is not None


@pytest.mark.filterwarnings("ignore:.*(does not have many workers|num_workers).*")
def test_a_capture_that_fails_leaves_the_run_eager_with_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    """The whole `cuda_graphs` path of a fit where the capture cannot happen (here: no CUDA device, the device check
    passed by): one warning naming the setting, and the adapters of the plain fit, under gradient accumulation."""
    plain = _fit(_sft(tiny_model_dir, cuda_graphs=False), tmp_path / "a", tiny_model_dir, 4, accumulate_grad_batches=2)
    monkeypatch.setattr(graphs, "check_capturable", lambda module, setting: None)

    def refused():
        raise RuntimeError("no capture here")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", refused)
    module = _sft(tiny_model_dir, cuda_graphs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured = _fit(module, tmp_path / "b", tiny_model_dir, 4, accumulate_grad_batches=2)
    said = [str(w.message) for w in caught if "could not be captured" in str(w.message)]
    assert len(said) == 1 and said[0] == ("model.cuda_graphs: the step could not be captured in a CUDA graph "
                                          "(RuntimeError: no capture here); it runs eagerly"), said
    assert module._graphs.failed and not module._graphs.graphs
    assert plain.keys() == captured.keys()
    for k in plain:
        torch.testing.assert_close(captured[k], plain[k], rtol=1e-4, atol=1e-6)


# -- on a CUDA device ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def _lm_objective(model):
    """`fn(batch) -> (objective, loss)`: the model's own LM loss over `input_ids`, what the runner replays."""

    def fn(b):
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss
        return loss, loss

    return fn


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


@gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_replays_follow_the_weights_under_autocast(tiny_model_dir, checkpointing):
    """A replay after the weights changed gives the eager gradients of the new weights, under bf16 autocast (whose
    cached casts of the LoRA weights must be recorded in the graph, not frozen into it)."""
    model = _lora_model(tiny_model_dir, gradient_checkpointing=checkpointing).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    runner = graphs.CapturedGradients(params)
    x = torch.randint(3, 100, (4, 64), device="cuda")

    fn = _lm_objective(model)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return runner.run(fn, {"input_ids": x})[0]

    for _ in range(4):
        step()
    assert runner.graphs and runner.replays >= 1 and runner.failed is None, runner.failed
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    loss = step()
    replayed = _grads(params)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(input_ids=x, labels=x, use_cache=False).loss
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-3, atol=1e-3)
    for g, r in zip(replayed, _grads(params)):
        assert _rel(g, r) < 1e-2


@gpu
def test_a_larger_shape_restarts_the_pool_and_every_shape_replays_exactly(tiny_model_dir):
    """Shapes in any order: a shape larger than every captured one drops the graphs and starts the pool with it (the
    smaller ones then recaptured into its memory); every run's gradients equal the eager step's."""
    model = _lora_model(tiny_model_dir).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    runner = graphs.CapturedGradients(params)
    torch.manual_seed(2)
    xs = [torch.randint(3, 100, (4, n), device="cuda") for n in (64, 128, 64, 192, 128)]

    fn = _lm_objective(model)

    for x in xs * 2:
        runner.run(fn, {"input_ids": x}, fresh=True)
        got = _grads(params)
        model.zero_grad(set_to_none=True)
        fn({"input_ids": x})[0].backward()
        for g, r in zip(got, _grads(params)):
            assert _rel(g, r) < 1e-5
    assert runner.failed is None and runner.resets == 1 and len(runner.graphs) == 3 and runner.replays >= 5


@gpu
def test_dropout_masks_are_recomputed_alike_under_checkpointing(tiny_model_dir):
    """LoRA dropout with reentrant checkpointing: from the same RNG state, a replay's gradients equal the eager
    step's (the recompute draws the forward's masks inside the graph too)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name_or_path=tiny_model_dir, dtype="float32", gradient_checkpointing=True),
                        LoraSpec(r=4, alpha=8, dropout=0.3)).cuda().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    runner = graphs.CapturedGradients(params)
    x = torch.randint(3, 100, (4, 64), device="cuda")

    fn = _lm_objective(model)

    for _ in range(3):
        model.zero_grad(set_to_none=True)
        runner.run(fn, {"input_ids": x})
    assert runner.replays >= 1 and runner.failed is None, runner.failed
    results = []
    for replay in (True, False):
        torch.cuda.manual_seed(1234)
        model.zero_grad(set_to_none=True)
        if replay:
            runner.run(fn, {"input_ids": x})
        else:
            fn({"input_ids": x})[0].backward()
        results.append(_grads(params))
    for g, r in zip(*results):
        assert _rel(g, r) < 1e-5


@gpu
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|num_workers).*")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_fit_with_graphs_trains_as_one_without(tiny_model_dir, tmp_path, precision):
    """The fit's adapters with `cuda_graphs` (graphs captured and replayed, gradient accumulation 2, validation after
    every epoch: the graphs released before it and captured again after) against the same fit without: equal in
    fp32, close under bf16 autocast; a second fit of the same module (moved to the CPU and back in between) too."""
    kw = dict(accumulate_grad_batches=2, precision=precision, limit_val_batches=2)
    plain = _fit(_sft(tiny_model_dir, cuda_graphs=False), tmp_path / "a", tiny_model_dir, 8, "gpu", **kw)
    module = _sft(tiny_model_dir, cuda_graphs=True)
    captured = _fit(module, tmp_path / "b", tiny_model_dir, 8, "gpu", **kw)
    assert module._graphs.failed is None and module._graphs.replays >= 4, module._graphs.failed
    assert module._graphs.resets >= 3  # (released before each of the 4 validations but the first)
    for k in plain:  # (Adam's steps amplify rounding where a gradient is near zero: the whole tensor's error)
        assert _rel(captured[k], plain[k]) < (1e-3 if precision == "32-true" else 3e-2), k
    # a second fit of each: Lightning's teardown moved the modules to the CPU, so the graphs are captured again
    replays = module._graphs.replays
    plain_module = _sft(tiny_model_dir, cuda_graphs=False)
    plain_module.configure_model()
    plain_module.model.load_state_dict(module.model.state_dict())
    again_plain = _fit(plain_module, tmp_path / "c", tiny_model_dir, 4, "gpu", **kw)
    again = _fit(module, tmp_path / "d", tiny_model_dir, 4, "gpu", **kw)
    assert module._graphs.replays > replays and module._graphs.failed is None
    for k in again_plain:
        assert _rel(again[k], again_plain[k]) < (1e-3 if precision == "32-true" else 3e-2), k
