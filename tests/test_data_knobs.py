"""Training knobs users of TRL and Axolotl reach for: NEFTune, lr_find, ShareGPT rows (issue 22)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lit_ft import InstructionDataModule, LoraSpec, ModelSpec, OptimSpec, SFTModule


def _module(tiny_model_dir, **kw):
    return SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0), **kw)


def test_neftune_noise_is_uniform_of_the_papers_scale_in_training_only(tiny_model_dir):
    module = _module(tiny_model_dir, neftune_alpha=5.0)
    module.configure_model()
    embed = module.model.get_input_embeddings()
    ids = torch.randint(0, 100, (4, 24))
    plain = torch.nn.functional.embedding(ids, embed.weight)  # the embedding without any hook
    module.eval()
    assert torch.equal(embed(ids), plain)  # evaluation and generation: no noise
    module.train()
    torch.manual_seed(0)
    noise = embed(ids) - plain
    scale = 5.0 / math.sqrt(24 * plain.shape[-1])  # alpha / sqrt(L d), Jain et al. 2023, Algorithm 1
    assert noise.abs().max() <= scale * (1 + 1e-5) and noise.abs().max() > 0.95 * scale
    # Uniform(-s, s): mean 0, variance s^2 / 3
    assert abs(noise.mean()) < 0.05 * scale and math.isclose(noise.var().item(), scale**2 / 3, rel_tol=0.1)


def test_neftune_changes_training_losses_not_validation(tiny_model_dir):
    batch = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    losses = {}
    for alpha in (None, 15.0):
        torch.manual_seed(0)
        module = _module(tiny_model_dir, neftune_alpha=alpha)
        module.configure_model()
        module.train()
        train = module.token_loss(batch)[0]
        module.eval()
        losses[alpha] = (train, module.token_loss(batch)[0])
    assert not torch.equal(losses[None][0], losses[15.0][0])
    assert torch.equal(losses[None][1], losses[15.0][1])


def test_lr_find_finds_and_sets_the_learning_rate(tiny_model_dir, tmp_path):
    from lightning.pytorch.tuner import Tuner

    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."} for a in range(8)
            for b in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = _module(tiny_model_dir, optim=OptimSpec(lr=1e-4))
    dm = InstructionDataModule(train_file=str(data), tokenizer=tiny_model_dir, max_length=32, batch_size=4,
                               val_split=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0)
    finder = Tuner(trainer).lr_find(module, datamodule=dm, min_lr=1e-5, max_lr=1.0, num_training=30,
                                    early_stop_threshold=None)
    assert finder is not None and len(finder.results["lr"]) == 30
    suggestion = finder.suggestion()
    assert suggestion is not None and module.optim.lr == pytest.approx(suggestion) and module.lr == module.optim.lr
    assert isinstance(module.optim, OptimSpec) and module.optim.lr != 1e-4


# ------------------------------------------------------------------------------------------------ data shapes


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sharegpt_rows_become_chat_messages(tmp_path, tiny_model_dir):
    from lit_ft.data.records import load_records
    from lit_ft.errors import DataError

    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"{a} + 1?"},
                               {"from": "gpt", "value": str(a + 1)}]} for a in range(4)]
    records, report = load_records(_jsonl(tmp_path / "sg.jsonl", rows), "instruction")
    assert records[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                                      {"role": "assistant", "content": "2"}]
    assert report.rows_kept == 4
    dm = InstructionDataModule(train_file=str(tmp_path / "sg.jsonl"), tokenizer=tiny_model_dir, max_length=48,
                               val_split=0)
    dm.setup("fit")
    ids = dm.train_dataset[0]["input_ids"]
    labels = dm.train_dataset[0]["labels"]
    assert dm.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100]).startswith("1")  # the answer
    bad = rows[:1] + [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'conversations\[1\]\.from': ShareGPT speaker 'robot' "
                                        r"is not one of \['assistant', 'bard', 'bing', 'chatgpt', 'function_call', 'gpt', 'human'"):
        load_records(_jsonl(tmp_path / "bad.jsonl", bad), "instruction")


def test_columns_are_renamed_before_the_format_is_detected(tmp_path, tiny_model_dir):
    from lit_ft.data.readers import SourceSpec
    from lit_ft.errors import ConfigError

    rows = [{"q": f"What is {a} + 1?", "reply": str(a + 1)} for a in range(6)]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    dm = InstructionDataModule(train_file=path, tokenizer=tiny_model_dir, max_length=48, val_split=0,
                               source=SourceSpec(columns={"q": "prompt", "reply": "completion"}))
    dm.setup("fit")
    assert len(dm.train_dataset) == 6
    with pytest.raises(ConfigError, match=r"data.source.columns: \['question'\] are not columns of "
                                          r"data.train_file=.*qa.jsonl \(it has \['q', 'reply'\]\)"):
        InstructionDataModule(train_file=path, tokenizer=tiny_model_dir, val_split=0,
                              source=SourceSpec(columns={"question": "prompt"})).setup("fit")
    with pytest.raises(ConfigError, match=r"data.source.columns=\['q'\]: expected a mapping"):
        SourceSpec(columns=["q"])


def test_the_val_file_reads_its_own_split_of_a_saved_dataset(tmp_path, tiny_model_dir):
    import datasets

    from lit_ft.data.readers import SourceSpec

    def rows(n, offset):
        return [{"prompt": f"What is {a} + 1?", "completion": str(a + 1)} for a in range(offset, offset + n)]

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(8, 0)),
                          "dev": datasets.Dataset.from_list(rows(3, 100))}).save_to_disk(str(folder))
    dm = InstructionDataModule(train_file=str(folder), val_file=str(folder), tokenizer=tiny_model_dir,
                               max_length=48, source=SourceSpec(val_split="dev"))
    dm.setup("fit")
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 3
    assert dm.val_records[0]["messages"][0]["content"] == "What is 100 + 1?"


# ------------------------------------------------------------------------------------------------ length grouping


def _length_loader(row_lengths, **kw):
    import datasets

    from lit_ft.train.resume import ResumableDataLoader

    ds = datasets.Dataset.from_dict({"idx": list(range(len(row_lengths))),
                                     "input_ids": [[1] * n for n in row_lengths]})
    return ResumableDataLoader(ds, batch_size=4, seed=3, collate_fn=lambda rows: [r["idx"] for r in rows], **kw)


def test_length_grouped_batches_hold_similar_lengths_and_resume_exactly():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (96,), generator=g).tolist()
    grouped = list(_length_loader(lengths, lengths=lengths, megabatch=4))
    plain = list(_length_loader(lengths))
    order = [i for b in grouped for i in b]
    assert sorted(order) == list(range(96))  # every row once an epoch
    for a in range(0, 96, 16):  # mega-batches of 4 batches x 4 rows, each sorted longest first
        chunk = [lengths[i] for i in order[a:a + 16]]
        assert chunk == sorted(chunk, reverse=True)
    assert sorted(order[:16]) == sorted(i for b in plain[:4] for i in b)  # the same rows as the shuffled order

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(grouped) < 0.5 * spread(plain)

    # Resume after 5 batches: the rest of the epoch is the uninterrupted one's.
    first = _length_loader(lengths, lengths=lengths, megabatch=4)
    it = iter(first)
    seen = [next(it) for _ in range(5)]
    state = first.state_dict()
    second = _length_loader(lengths, lengths=lengths, megabatch=4)
    second.load_state_dict(state)
    assert seen + list(second) == grouped


def test_instruction_data_groups_by_length(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Say " + "x " * (i % 17), "completion": "ok"} for i in range(48)]
    path = _jsonl(tmp_path / "len.jsonl", rows)
    dm = InstructionDataModule(train_file=path, tokenizer=tiny_model_dir, max_length=64, val_split=0, batch_size=4,
                               group_by_length=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    lengths = [len(x) for x in dm.train_dataset["input_ids"]]
    assert loader.sampler.lengths == lengths
    padded = [b["input_ids"].shape[1] for b in loader]  # padded length of each batch
    dm_plain = InstructionDataModule(train_file=path, tokenizer=tiny_model_dir, max_length=64, val_split=0,
                                     batch_size=4)
    dm_plain.setup("fit")
    assert sum(padded) < sum(b["input_ids"].shape[1] for b in dm_plain.train_dataloader())
