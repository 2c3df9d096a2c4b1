"""`model.lora.init`: PiSSA / OLoRA / LoftQ starts. Checked against PEFT loading the export on an untouched base
(the independent reference), the start surviving a resume, and every combination the run cannot honour refused in
one line before the weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_ft import LoraSpec, ModelSpec, SFTModule
from lit_ft.cli.app import main
from lit_ft.models import INIT_ATTR, load_base, restore_start
from lit_ft.train.checkpointing import START_KEY
from tests.test_hostile import BASE, fit_args, one_error_line, sft_file  # noqa: F401  (sft_file is a fixture)

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 4]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def trained(init: str, base: str = BASE, **lora) -> SFTModule:
    """An SFT module with `init`, its adapter moved as training would move it."""
    torch.manual_seed(1)
    module = SFTModule(base=ModelSpec(name_or_path=base), lora=LoraSpec(r=4, alpha=8, dropout=0.0, init=init, **lora))
    module.configure_model()
    module.model.eval()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_mutating_start_leaves_the_model_unchanged_and_exports_a_plain_lora_of_the_trained_model(init, tmp_path):
    base = load_base(ModelSpec(name_or_path=BASE), "causal_lm").eval()
    torch.manual_seed(1)
    fresh = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4, alpha=8, dropout=0.0, init=init))
    fresh.configure_model()
    start = getattr(fresh.model, INIT_ATTR)
    assert start and all(v.abs().sum() > 0 for v in start.values())  # the adapter is not a no-op ...
    torch.testing.assert_close(logits(fresh.model.eval()), logits(base), atol=2e-4, rtol=1e-4)  # ... the model is

    module = trained(init)
    out = module.save_adapter(tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_base(ModelSpec(name_or_path=BASE), "causal_lm"), str(out)).eval()
    torch.testing.assert_close(logits(reloaded), logits(module.model), atol=2e-4, rtol=1e-4)
    assert (logits(reloaded) - logits(base)).abs().max() > 1e-2  # the trained change is in the export


def test_the_start_of_the_checkpoint_is_put_back_when_a_rebuild_differs(tmp_path):
    """A resume on another device may get another SVD: the base residual is moved so that the checkpoint's adapter
    is on the residual it trained against."""
    first = trained("pissa", init_svd_iters=2)
    saved = {k: v.clone() for k, v in getattr(first.model, INIT_ATTR).items()}
    adapter = {k: v.clone() for k, v in first.state_dict().items() if "lora_" in k}
    other = SFTModule(base=ModelSpec(name_or_path=BASE), lora=LoraSpec(r=4, alpha=8, dropout=0.0, init="pissa"))
    other.configure_model()  # the exact SVD: another start
    assert any(not torch.equal(saved[k], v) for k, v in getattr(other.model, INIT_ATTR).items())
    other.load_state_dict(adapter, strict=False)
    restore_start(other.model, saved)
    torch.testing.assert_close(logits(other.model.eval()), logits(first.model), atol=2e-4, rtol=1e-4)
    assert all(torch.equal(saved[k], v) for k, v in getattr(other.model, INIT_ATTR).items())


def test_a_pissa_run_resumes_and_exports_from_its_checkpoint(sft_file, tmp_path):  # noqa: F811
    extra = ["--model.lora.init", "pissa", "--model.lora.init_svd_iters", "2", "--model.optim.scheduler", "constant",
             "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2",
             "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "-1"]
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "2", *extra))
    main(fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "4", *extra, "--ckpt_path", "last"))
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 4 and state[START_KEY]
    main(["export", "adapter", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapter")])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        a = next(k for k in f.keys() if k.endswith("lora_A.weight"))
        assert f.get_tensor(a).shape[0] == 8  # rank 2r: the plain LoRA on the unchanged base


def test_loftq_fits_the_adapter_to_the_quantization_error():
    """On an NF4 base, W_q + s*B*A is closer to the original W than W_q alone (Li et al. 2023)."""
    import bitsandbytes.functional as bnbf

    module = SFTModule(base=ModelSpec(name_or_path=BASE, quantization="nf4", compute_dtype="float32"),
                       lora=LoraSpec(r=4, alpha=8, init="loftq"))
    module.configure_model()
    layer = next(m for n, m in module.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with safe_open(f"{BASE}/model.safetensors", "pt") as f:
        original = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    weight = layer.get_base_layer().weight
    quantized = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    fitted = quantized + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert (original - fitted).norm() < 0.9 * (original - quantized).norm()


@pytest.mark.parametrize("extra,expected", [
    (["--model.lora.init", "pissa", "--model.base.quantization", "nf4"], "cannot hold exactly"),
    (["--model.lora.init", "olora", "--model.lora.use_dora", "true"], "use_dora"),
    (["--model.lora.init", "loftq"], "model.base.quantization nf4"),
    (["--model.lora.init", "pissa", "--model.lora.init_svd_iters", "-1"], "init_svd_iters"),
])
def test_a_start_the_run_cannot_honour_is_one_error_line(sft_file, tmp_path, capsys, extra, expected):  # noqa: F811
    one_error_line(capsys, fit_args(sft_file, tmp_path / "runs", "--trainer.max_steps", "1", *extra), expected)


def test_olora_on_transposed_projections_is_refused_and_pissa_exports_them(tmp_path):
    """GPT-2 keeps its projections as Conv1D ([in, out]): PEFT's OLoRA start ignores that (the forward would fail on
    the shapes), PiSSA handles it and its export reloads onto the untouched base."""
    import shutil

    from lit_ft.errors import ConfigError
    from tests.family_models import make_family_model

    make_family_model("gpt2", str(tmp_path / "gpt2"), 512)
    for f in Path(BASE).glob("tokenizer*"):
        shutil.copy(f, tmp_path / "gpt2")
    spec = ModelSpec(name_or_path=str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match=r"init=olora: .*\['c_attn', 'c_fc', 'c_proj'\]: GPT-2-style Conv1D"):
        SFTModule(base=spec, lora=LoraSpec(r=4, init="olora")).configure_model()
    module = trained("pissa", base=spec.name_or_path)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_base(spec, "causal_lm"), str(module.save_adapter(tmp_path / "a"))).eval()
    ids = IDS % 512
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits,
                                   atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("module", ["lit_ft.DPOModule", "lit_ft.GRPOModule"])
def test_stages_with_a_reference_refuse_a_start_that_is_not_a_no_op(tmp_path, capsys, module):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no", "answer": "1"}) + "\n"
                            for i in range(8)))
    data = "lit_ft.PreferenceDataModule" if module == "lit_ft.DPOModule" else "lit_ft.PromptDataModule"
    extra = ["--model.lora.init", "pissa"]
    if module == "lit_ft.GRPOModule":
        extra += ["--model.reward_fn", "lit_ft.data.tasks.correctness_reward"]
    one_error_line(capsys, fit_args(str(rows), tmp_path / "runs", *extra, module=module, data=data),
                   "model.lora.init=pissa", "reference")
