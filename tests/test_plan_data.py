"""The memory plan from the real rows: hand-made JSON Lines files whose token lengths are known (a word-level
tokenizer, one token a word, the `plain` template: prompt + response + EOS), planned through the DataModule's own
tokenization and checked against the batches its real loaders and collators yield; hub data and unreadable files
fall back to `max_length`, said in the table; big files are sampled and say so."""

from __future__ import annotations

import json

import pytest

from lit_ft.cli import plan as plan_cli
from lit_ft.plan import memory as plan, rows as plan_data
from lit_ft.models import LoraSpec, ModelSpec

SFT_ROWS = [(3, 2), (10, 5), (4, 20), (1, 1)]  # (prompt words, completion words): 1 token a word, + EOS
PAIRS = [(2, 3, 7), (5, 1, 1), (1, 9, 2)]  # (prompt, chosen, rejected) words
PROMPTS = [4, 9, 2, 6]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """`w<i>` words are one token each (ids 4..63); pad 0, EOS 2; no chat template (the files use `plain`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 64)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(d)
    return str(d)


def words(n: int, w: str = "w5", lead: str = "") -> str:
    return lead + " ".join([w] * n)


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_file(tmp_path, rows=SFT_ROWS, name="sft.jsonl") -> str:
    return write(tmp_path / name, [{"prompt": words(p), "completion": words(c, "w6", " ")} for p, c in rows])


def sft_dm(path, tok, **kw):
    from lit_ft.data.modules import InstructionDataModule

    return InstructionDataModule(train_file=path, val_split=0.0, tokenizer=tok, template="plain",
                                 **{"max_length": 64, "batch_size": 2, **kw})


def sft_module(model_dir):
    from lit_ft.stages.sft import SFTModule

    return SFTModule(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4))


def batches(dm):
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_sft_plans_the_longest_real_row(tmp_path, word_tokenizer, tiny_model_dir):
    """Rows of 3+2+1, 10+5+1, 4+20+1 and 1+1+1 tokens: the plan takes 25 tokens, not max_length 64, as wide as the
    widest batch the real loader yields; the trained tokens of a batch are at most the two largest label counts
    (completion + EOS: 21 + 6)."""
    dm = sft_dm(sft_file(tmp_path), word_tokenizer)
    s = plan.settings_from(sft_module(tiny_model_dir), dm, target="cpu")
    assert dm.train_dataset is None, "the plan tokenizes a copy: the caller's DataModule is not set up"
    assert s.data.longest == 25 and s.data.label_counts == (21, 6, 3, 2) and s.data.padded
    assert plan_data.seq_len(s) == 25 and plan_data.loss_tokens(s, 2, 25) == 27
    real = batches(sft_dm(sft_file(tmp_path), word_tokenizer))
    assert max(b["input_ids"].shape[1] for b in real) == 25
    assert max(int((b["labels"][:, 1:] != -100).sum()) for b in real) <= 27
    table = plan.estimate_settings(s, budget=None).table()
    assert "micro-batch 2 x 25 tokens" in table
    assert "rows: longest real row 25 tokens of 4 rows (max_length 64)" in table
    worst = plan.estimate_settings(plan.settings_from(sft_module(tiny_model_dir), None, target="cpu"), budget=None)
    assert "rows: no DataModule: every row max_length" in worst.table()


def test_pad_to_multiple_of_rounds_as_the_collator(tmp_path, word_tokenizer, tiny_model_dir):
    dm = sft_dm(sft_file(tmp_path), word_tokenizer, pad_to_multiple_of=8)
    s = plan.settings_from(sft_module(tiny_model_dir), dm, target="cpu")
    real = batches(sft_dm(sft_file(tmp_path), word_tokenizer, pad_to_multiple_of=8))
    assert s.data.longest == 32 == max(b["input_ids"].shape[1] for b in real)


@pytest.mark.parametrize("max_length,batch_size,expected", [(64, 3, (1, 47)), (30, 3, (2, 25)), (30, 2, (2, 25))])
def test_packed_shape_is_the_collators(tmp_path, word_tokenizer, tiny_model_dir, max_length, batch_size, expected):
    """Packing the B longest rows first-fit decreasing: 25 + 16 + 6 = 47 tokens in one row of 64; in rows of 30,
    25 alone and 16 + 6 (hand-derived), as `PackedSFTCollator` packs them."""
    dm = sft_dm(sft_file(tmp_path), word_tokenizer, packing=True, max_length=max_length, batch_size=batch_size)
    s = plan.settings_from(sft_module(tiny_model_dir), dm, target="cpu")
    assert plan_data.packed_shape(s, batch_size) == expected
    dm.setup("fit")
    longest = sorted(dm.train_dataset, key=lambda r: -len(r["input_ids"]))[:batch_size]
    assert tuple(dm.collator()(longest)["input_ids"].shape) == expected


def test_pairs_plan_their_longest_side(tmp_path, word_tokenizer, tiny_model_dir):
    """Sides of 2+3+1, 2+7+1, 5+1+1 (twice) and 1+9+1, 1+2+1 tokens: 11 is the width of the widest real batch."""
    from lit_ft.data.modules import PreferenceDataModule
    from lit_ft.stages.dpo import DPOModule

    path = write(tmp_path / "pairs.jsonl", [{"prompt": words(p), "chosen": words(c, "w6", " "),
                                             "rejected": words(r, "w7", " ")} for p, c, r in PAIRS])

    def dm():
        return PreferenceDataModule(train_file=path, val_split=0.0, tokenizer=word_tokenizer, template="plain",
                                    max_length=64, batch_size=2)

    s = plan.settings_from(DPOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4)), dm(),
                           target="cpu")
    assert s.data.longest == 11 == max(b["input_ids"].shape[1] for b in batches(dm()))
    assert s.data.label_counts == (10, 8, 4, 3, 2, 2) and s.data.kind == "pair side"
    assert "rows: longest real pair side 11 tokens of 3 rows" in plan.estimate_settings(s, budget=None).table()


def test_packed_reward_plans_its_longest_sequences_packed(tmp_path, word_tokenizer, tiny_model_dir):
    """The reward model with `data.packing`: the 2B = 4 longest pair sides (11, 10, 7 and 7 tokens) packed into one
    row of 35, not 4 padded rows of 11; every real packed batch is within it, and the planned saved activations
    shrink with the tokens."""
    from lit_ft.data.modules import PreferenceDataModule
    from lit_ft.plan.stages import reward_shape
    from lit_ft.stages.reward import RewardModule

    path = write(tmp_path / "pairs.jsonl", [{"prompt": words(p), "chosen": words(c, "w6", " "),
                                             "rejected": words(r, "w7", " ")} for p, c, r in PAIRS])

    def settings(packing):
        dm = PreferenceDataModule(train_file=path, val_split=0.0, tokenizer=word_tokenizer, template="plain",
                                  max_length=64, batch_size=2, packing=packing)
        module = RewardModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4))
        return plan.settings_from(module, dm, target="cpu"), dm

    def saved(s):
        return sum(b for c, b, _ in plan.estimate_settings(s, budget=None).rows if c.startswith("activations (saved"))

    (packed, dm), (padded, _) = settings(True), settings(False)
    assert reward_shape(packed) == (1, 35) and reward_shape(padded) == (4, 11)
    assert all(b["input_ids"].numel() <= 35 for b in batches(dm))
    assert saved(packed) < saved(padded)


def test_prompts_plan_the_longest_prompt_and_the_engine_the_longest_seen(tmp_path, word_tokenizer, tiny_model_dir):
    """Left-padded prompts: the rollout is planned at the longest training prompt (9), the static engine at the
    longest prompt it will see, validation included (12)."""
    from lit_ft.data.modules import PromptDataModule
    from lit_ft.online.generation import SamplingSpec
    from lit_ft.stages.grpo import GRPOModule

    train = write(tmp_path / "prompts.jsonl", [{"prompt": words(n)} for n in PROMPTS])
    val = write(tmp_path / "val.jsonl", [{"prompt": words(12)}, {"prompt": words(3)}])

    def dm():
        return PromptDataModule(train_file=train, val_file=val, tokenizer=word_tokenizer, template="plain",
                                max_length=64, batch_size=2, answer_field=None)

    module = GRPOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4),
                        sampling=SamplingSpec(max_new_tokens=5), reward_fn="lit_ft.data.tasks.correctness_reward")
    s = plan.settings_from(module, dm(), target="cuda")
    assert (s.data.longest, s.data.eval_longest) == (9, 12)
    real = dm()
    real.setup("fit")
    assert max(b["input_ids"].shape[1] for b in real.train_dataloader()) == 9
    assert max(b["input_ids"].shape[1] for b in real.val_dataloader()) == 12
    from lit_ft.plan import online as plan_online

    assert plan_online.shapes(s)[2] == 9 and plan_online.engine_prompt(s, 9) == 12
    rows = {c: how for c, _, how in plan.estimate_settings(s, budget=None).rows}
    assert rows["KV cache (rollout)"].startswith("16 rows x (12 + 5) positions")


def test_hub_data_and_unreadable_files_plan_max_length(tmp_path, word_tokenizer, tiny_model_dir):
    for source, why in (("someone/some-dataset", "someone/some-dataset is a hub dataset (not read by the plan)"),
                        (str(tmp_path / "absent.jsonl"), "absent.jsonl cannot be read as a file")):
        s = plan.settings_from(sft_module(tiny_model_dir), sft_dm(source, word_tokenizer), target="cpu")
        assert s.data is None and why in s.rows_note
        table = plan.estimate_settings(s, budget=None).table()
        assert "micro-batch 2 x 64 tokens" in table and "every row max_length" in table
    bad = write(tmp_path / "bad.jsonl", [{"nothing": "here"}])
    s = plan.settings_from(sft_module(tiny_model_dir), sft_dm(bad, word_tokenizer), target="cpu")
    assert s.data is None and "not tokenized (" in s.rows_note


def test_big_files_are_sampled_and_say_so(tmp_path, word_tokenizer, tiny_model_dir, monkeypatch):
    """Over SCAN_BYTES only the first SCAN_ROWS lines are tokenized: rows 1-2 (6 and 16 tokens), not the longest
    (25, line 3); the table says the scan was capped."""
    monkeypatch.setattr(plan_data, "SCAN_BYTES", 10)
    monkeypatch.setattr(plan_data, "SCAN_ROWS", 2)
    s = plan.settings_from(sft_module(tiny_model_dir), sft_dm(sft_file(tmp_path), word_tokenizer), target="cpu")
    assert s.data.longest == 16 and "of the first 2 rows of sft.jsonl (scan capped at 2 lines" in s.data.note
    csv = tmp_path / "sft.csv"
    csv.write_text("prompt,completion\nw5,w6\n")
    s = plan.settings_from(sft_module(tiny_model_dir), sft_dm(str(csv), word_tokenizer), target="cpu")
    assert s.data is None and "only JSON Lines files that large are sampled" in s.rows_note


def test_a_datamodule_already_set_up_is_read_as_it_is(tmp_path, word_tokenizer, tiny_model_dir):
    """`MemoryPlanLog` plans after Lightning's setup: the DataModule's own datasets, the same stats."""
    fresh = plan.settings_from(sft_module(tiny_model_dir), sft_dm(sft_file(tmp_path), word_tokenizer), target="cpu")
    ready = sft_dm(sft_file(tmp_path), word_tokenizer)
    ready.setup("fit")
    s = plan.settings_from(sft_module(tiny_model_dir), ready, target="cpu")
    assert (s.data.longest, s.data.label_counts, s.data.note) == (fresh.data.longest, fresh.data.label_counts,
                                                                  fresh.data.note)


def test_cli_plans_the_shipped_demo_rows(tiny_model_dir, capsys):
    """`lit-ft plan --config configs/dpo.yaml`: the demo pairs, tokenized as the fit tokenizes them."""
    assert plan_cli.main(["--config", "configs/dpo.yaml", "--model.base.name_or_path", tiny_model_dir,
                      "--budget", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "rows: longest real pair side" in out and "of 2000 rows" in out and "(max_length 256)" in out


def test_plan_vs_results_plans_every_stored_peak_within_15_percent(capsys):
    """benchmarks/plan_vs_results.py: the settings of every stored H200 result (the workload's config only, no
    weights) planned on the CPU; each lit_ft row within 15% of its measured `max_memory_allocated`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "plan_vs_results.py"
    spec = importlib.util.spec_from_file_location("plan_vs_results", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--no-bundled"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 27 and {r[0].strip("| ") for r in rows} == {"w1", "w3", "w4", "d1", "w5", "w5_8b"}
    for r in rows:
        planned, measured = float(r[2]), float(r[3])
        assert abs(measured / planned - 1) <= 0.15, r


UNPAIRED = [(2, 9, True), (12, 1, False), (3, 3, True), (1, 2, False)]  # (prompt, completion words, desirable)


@pytest.mark.parametrize("max_length, batch_size", [(64, 4), (16, 4), (64, 2)])
def test_kto_plans_its_longest_mismatched_pair(tmp_path, word_tokenizer, tiny_model_dir, max_length, batch_size):
    """KTO's mismatched pairs (each prompt followed by another row's completion, `UnpairedCollator`): planned at the
    longest prompt + the longest completion (12 + 9 + EOS = 22 tokens, hand-derived), cut to `max_length` as the
    collator cuts the prompt; the widest batch of mismatched pairs the real loader yields is never wider, and with
    the whole data in one batch exactly as wide. The examples themselves: their longest row (12 + 1 + 1 = 14)."""
    from lit_ft.data.unpaired import UnpairedPreferenceDataModule
    from lit_ft.stages.kto import KTOModule

    path = write(tmp_path / "unpaired.jsonl", [{"prompt": words(p), "completion": words(c, "w6", " "), "label": d}
                                               for p, c, d in UNPAIRED])

    def dm():
        return UnpairedPreferenceDataModule(train_file=path, val_file=path, tokenizer=word_tokenizer,
                                            template="plain", max_length=max_length, batch_size=batch_size)

    s = plan.settings_from(KTOModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4)), dm(),
                           target="cpu")
    assert (s.data.longest, s.data.mismatched, s.data.eval_mismatched, s.data.count) == (14, 22, 22, 8)
    assert plan_data.mismatched_len(s) == min(22, max_length) == plan_data.mismatched_len(s, validation=True)
    real = batches(dm())
    assert max(b["kl_input_ids"].shape[1] for b in real) <= plan_data.mismatched_len(s)
    if batch_size == len(UNPAIRED):
        assert max(b["kl_input_ids"].shape[1] for b in real) == plan_data.mismatched_len(s)
    assert max(b["input_ids"].shape[1] for b in real) == plan_data.seq_len(s) == 14
    rows = {c: how for c, _, how in plan.estimate_settings(s, budget=None).rows}
    key = next(k for k in rows if k.startswith("no-grad passes"))
    assert f"mismatched pairs {batch_size} x {min(22, max_length)}" in rows[key]
