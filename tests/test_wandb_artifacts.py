"""The exported adapter as a W&B `model` artifact (issue 22, item 5), with the real wandb library in offline mode.

An offline W&B run writes every record, the artifact's manifest included, into its `run-*.wandb` file (what
`wandb sync` uploads later); the test reads that file back with wandb's own protobuf classes and checks the
artifact against the adapter directory on disk: every file, its size and its MD5 (computed here with hashlib).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest

from lit_ft.train import rundirs
from lit_ft.cli.app import main

REPO = Path(__file__).resolve().parents[1]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a 7-byte header (`:W&B`, magic, version), then LevelDB-log framing (32 KiB
    blocks; each chunk a CRC32, a 2-byte length and a type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunks, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def _md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.fixture
def fit_args(tiny_model_dir, tmp_path):
    rows = [json.loads(x) for x in (REPO / "data/demo/sft_train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["fit", "--config", "sft", "--model.init_args.base.name_or_path", tiny_model_dir,
            "--model.init_args.lora", "{r: 4, alpha: 8, dropout: 0.0}", "--data.init_args.max_length", "64",
            "--data.init_args.train_file", str(data), "--data.init_args.val_file", str(data),
            "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # an earlier test may leave W&B's process-wide settings (another mode) behind
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(rundirs.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # W&B's staging copies of artifact files
    yield
    wandb.teardown()


def _run_records(run_dir: Path) -> list:
    """The records of the run's one W&B run file (inside the run's directory), once W&B has written it."""
    import wandb

    wandb.teardown()  # W&B's service writes the run file asynchronously: stopping it flushes it (as exit does)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return wandb_records(files[0])


def _artifacts(run_dir: Path) -> tuple[list, str]:
    records = _run_records(run_dir)
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    return [a for a in artifacts if a.type == "model"], run_id  # the sample tables are `run_table` artifacts


def test_the_exported_adapter_is_a_model_artifact_of_the_offline_run(fit_args, offline_wandb, tmp_path, caplog):
    main([*fit_args, "--trainer.logger.init_args.log_adapter", "true"])
    run_dir = tmp_path / "runs/sft/version_0"
    adapter = run_dir / "adapter"
    artifacts, run_id = _artifacts(run_dir)
    assert len(artifacts) == 1
    art = artifacts[0]
    assert (art.type, art.name, sorted(art.aliases)) == ("model", f"adapter-{run_id}", ["latest", "step-3"])

    # The manifest lists exactly the adapter directory's files, each with its size and MD5, and W&B's staging
    # copy (what `wandb sync` uploads) holds the same bytes.
    on_disk = {p.relative_to(adapter).as_posix(): p for p in adapter.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "lit_ft_base.json"} <= set(on_disk)
    entries = {e.path: e for e in art.manifest.contents}
    assert set(entries) == set(on_disk)
    for name, path in on_disk.items():
        assert (entries[name].size, entries[name].digest) == (path.stat().st_size, _md5_b64(path)), name
        assert Path(entries[name].local_path).read_bytes() == path.read_bytes()

    meta = json.loads(art.metadata)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["stage"] == "SFTModule" and meta["global_step"] == 3 and meta["task_type"] == "CAUSAL_LM"
    assert meta["base"] == config["base_model_name_or_path"] and meta["run_dir"] == str(run_dir)
    assert (meta["lora"]["r"], meta["lora"]["lora_alpha"]) == (4, 8)
    assert sorted(meta["lora"]["target_modules"]) == sorted(config["target_modules"])
    assert meta["metrics"]["val/loss"] > 0 and "train/loss" in meta["metrics"]

    wandb_dir = next((run_dir / "wandb").glob("offline-run-*"))
    line = (f"W&B run is offline: adapter artifact adapter-{run_id} (type model) is stored in the run's files; "
            f"`wandb sync {wandb_dir.relative_to(tmp_path)}` uploads it")  # relative to the directory of the command
    assert line in caplog.messages  # Lightning's rank-zero log: the console under `lit-ft`


def test_no_artifact_unless_asked(fit_args, offline_wandb, tmp_path):
    main(fit_args)
    artifacts, _ = _artifacts(tmp_path / "runs/sft/version_0")
    assert artifacts == [] and (tmp_path / "runs/sft/version_0/adapter/adapter_config.json").exists()


def test_the_whole_resolved_config_reaches_the_wandb_run(fit_args, offline_wandb, tmp_path):
    main([*fit_args, "--seed_everything", "7"])
    config = {}
    for r in _run_records(tmp_path / "runs/sft/version_0"):
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["seed_everything"] == 7  # the seed and the trainer, not only the module's hparams
    assert config["trainer"]["max_steps"] == 3 and config["trainer"]["default_root_dir"]
    assert config["model"]["init_args"]["lora"]["r"] == 4
    assert config["data"]["init_args"]["train_file"] == str(tmp_path / "small.jsonl")


def test_disabled_wandb_says_so_in_one_line(tmp_path, monkeypatch):
    import wandb

    from lit_ft.callbacks import WandbLogger

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    logger = WandbLogger(save_dir=str(tmp_path), log_adapter=True)
    try:
        line = logger.log_adapter_artifact(tmp_path / "adapter", {"stage": "SFTModule"}, step=1)
    finally:
        wandb.teardown()
    assert line == f"W&B is disabled (WANDB_MODE=disabled): adapter {tmp_path / 'adapter'} not logged as an artifact"
    assert not list(tmp_path.rglob("*.wandb"))


def test_log_model_while_offline_is_turned_off_with_a_warning(tmp_path, monkeypatch):
    from lit_ft.callbacks import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.warns(UserWarning, match=r"the run is offline, so no checkpoint is uploaded"):
        logger = WandbLogger(save_dir=str(tmp_path), log_model=True, log_adapter=True)
    assert logger._log_model is False and logger.log_adapter is True
