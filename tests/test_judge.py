"""`lit-ft judge`: the paired statistics against hand computation, the KL estimate against an independent forward
of the whole sequence, the judge's scores against `RewardScorer` on the same texts, and bad input in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_ft.cli.app import main
from lit_ft.online.judge import BASE, logprob_sums, paired
from tests.test_hostile import one_error_line

FIXTURES = Path(__file__).parent / "fixtures" / "premove"
BASE_DIR = str(FIXTURES / "base")


def test_paired_statistics_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 1.0])
    s = paired(a, b)
    wins, diff = [1, 0.5, 0, 1], [1, 0, -2, 3]

    def se(x):
        m = sum(x) / len(x)
        return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x))

    assert s["n"] == 4 and s["win_rate"] == pytest.approx(0.625) and s["score_diff"] == pytest.approx(0.5)
    assert s["win_se"] == pytest.approx(se(wins)) and s["diff_se"] == pytest.approx(se(diff))


@pytest.fixture(scope="module")
def moved_adapter(tmp_path_factory) -> str:
    """A causal-LM adapter that changes the model (random B), saved as an export."""
    from peft import LoraConfig, get_peft_model

    from lit_ft.models import ModelSpec, load_base

    torch.manual_seed(0)
    model = get_peft_model(load_base(ModelSpec(name_or_path=BASE_DIR), "causal_lm"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("moved") / "adapter"
    model.save_pretrained(out)
    return str(out)


def test_kl_is_the_log_ratio_of_an_independent_full_forward(moved_adapter):
    from peft import PeftModel

    from lit_ft.models import ModelSpec, load_base

    model = PeftModel.from_pretrained(load_base(ModelSpec(name_or_path=BASE_DIR), "causal_lm"), moved_adapter,
                                      adapter_name="moved").eval()
    prompt = torch.tensor([[0, 5, 9, 14], [3, 7, 8, 2]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left-padded
    responses = torch.tensor([[4, 6, 11], [12, 1, 0]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = (prompt, prompt_mask, responses, response_mask)
    temperature = 0.7

    def reference(active: bool) -> torch.Tensor:
        """log-probs of each row's real response tokens from one unpadded forward of prompt + response."""
        out = []
        for i in range(2):
            ids = torch.cat([prompt[i][prompt_mask[i].bool()], responses[i][response_mask[i].bool()]])[None]
            with torch.no_grad():
                if active:
                    logits = model(input_ids=ids).logits
                else:
                    with model.disable_adapter():
                        logits = model(input_ids=ids).logits
            n = int(response_mask[i].sum())
            logp = torch.log_softmax(logits[0, -n - 1 : -1].double() / temperature, -1)
            out.append(logp.gather(-1, ids[0, -n:, None]).sum())
        return torch.stack(out).float()

    own, base = logprob_sums(model, "moved", batch, temperature), logprob_sums(model, BASE, batch, temperature)
    torch.testing.assert_close(own, reference(True), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(base, reference(False), atol=2e-4, rtol=1e-4)
    assert (own - base).abs().max() > 1e-2  # the adapter moved the model: the estimate sees it


def test_the_command_scores_each_answer_as_the_reward_scorer_does(moved_adapter, tmp_path, capsys):
    from lit_ft.data.hh import prompt_for
    from lit_ft.data.records import load_records
    from lit_ft.data.templates import render_pair
    from lit_ft.models import ModelSpec, load_tokenizer
    from lit_ft.online.scoring import RewardScorer

    prompts = FIXTURES / "pairs.jsonl"
    out = tmp_path / "judged.json"
    judge = FIXTURES / "reward_adapter"
    main(["judge", "--judge", f"a={judge}", "--judge", f"b={judge}", "--policy", "base", "--policy",
          f"moved={moved_adapter}", "--prompts", str(prompts), "--n", "6", "--max_new_tokens", "6",
          "--batch_size", "4", "--base", BASE_DIR, "--out", str(out)])
    table = capsys.readouterr().out
    assert "judge a\n" in table and "judge b\n" in table and "win rate vs base" in table and "distinct" in table
    report = json.loads(out.read_text())
    base, moved = report["policies"]
    assert base["vs_baseline"]["a"]["win_rate"] == 0.5 and base["mean_kl"] == 0.0
    assert moved["mean_kl"] > 0  # its own samples are likelier under itself than under the base
    assert moved["distinct"] == len({a["response"] for a in moved["answers"]})
    records = load_records(str(prompts), "prompt")[0][:6]
    tok = load_tokenizer(BASE_DIR)
    texts = ["".join(render_pair(prompt_for(r, "chat"), a["response"], tok, "chat"))
             for r, a in zip(records, moved["answers"])]
    expected = RewardScorer.from_pretrained(judge, base=ModelSpec(name_or_path=BASE_DIR)).score(texts)
    for j in ("a", "b"):  # both judges score the same answers (one sampling pass per policy)
        got = torch.tensor([a["scores"][j] for a in moved["answers"]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        wins = paired(expected, torch.tensor([a["scores"][j] for a in base["answers"]]))
        assert moved["vs_baseline"][j]["win_rate"] == pytest.approx(wins["win_rate"])


def test_adapters_written_along_a_run_are_the_policy_at_that_step(tmp_path):
    """`ExportAdapter(every_n_steps=N)` writes the policy each time the optimizer step count passes a multiple of N
    (PPO takes several optimizer steps a rollout), each loadable and equal to the weights at that step; the
    judged curve over training reads them."""
    from peft.utils import load_peft_weights

    from lit_ft.callbacks import ExportAdapter
    from lit_ft.stages.grpo_spec import GRPOSpec
    from tests.test_grpo import make_module
    from tests.test_ppo import prompt_loader, trainer
    from transformers import AutoTokenizer

    class Record(ExportAdapter):
        weights = {}

        def _write(self, trainer, pl_module, path, artifact):
            super()._write(trainer, pl_module, path, artifact)
            Record.weights[Path(path).name] = {n: p.detach().clone() for n, p in pl_module.named_parameters()
                                               if ".policy." in n}

    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    module = make_module(BASE_DIR, grpo=GRPOSpec(samples_per_prompt=2, mini_batch_size=4, num_iterations=2))
    export = Record(str(tmp_path / "adapter"), every_n_steps=3)
    trainer(4, callbacks=[export]).fit(module, train_dataloaders=prompt_loader(tokenizer, 4, 16))
    steps = sorted(p.name for p in (tmp_path / "adapter_steps").iterdir())
    # 4 optimizer steps a rollout (2 iterations x 8 rows / 4): 4, 8, 12, 16 pass 3, 6, 9, 12 and 15
    assert steps == ["step_000004", "step_000008", "step_000012", "step_000016"], steps
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    for step in steps:
        saved = load_peft_weights(str(tmp_path / "adapter_steps" / step))
        ours = {n[n.index("base_model."):].replace(".policy.", "."): p for n, p in Record.weights[step].items()
                if "lora_" in n}
        assert set(saved) == set(ours)
        for name, value in saved.items():
            torch.testing.assert_close(ours[name], value)
    first, last = (load_peft_weights(str(tmp_path / "adapter_steps" / s)) for s in (steps[0], steps[-1]))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the policy moved between them
    with pytest.raises(Exception, match="every_n_steps=0"):
        ExportAdapter(every_n_steps=0)


@pytest.mark.parametrize("extra,expected", [
    (["--policy", "sft"], "--policy 'sft': expected NAME=ADAPTER_DIR"),
    (["--policy", "base", "--baseline", "ppo"], "--baseline ppo: not one of the policies"),
    (["--policy", "x=/nowhere"], "--policy x: /nowhere has no adapter_config.json"),
    (["--policy", "base", "--n", "0"], "--n=0"),
])
def test_bad_arguments_are_one_error_line(capsys, extra, expected):
    one_error_line(capsys, ["judge", "--judge", str(FIXTURES / "reward_adapter"), "--prompts",
                            str(FIXTURES / "pairs.jsonl"), *extra], expected)
