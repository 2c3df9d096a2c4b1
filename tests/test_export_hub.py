"""`lit-ft export adapter|merge ... --push-to-hub REPO_ID` (issue 22, item 4): the argument parsing, and the one-line
errors (exit 2) when the upload cannot work. No test reaches the network: offline mode and a missing token are
refused before any request, and the failed upload talks to a closed port on this machine."""

from __future__ import annotations

import pytest
import torch

from lit_ft.cli.app import main
from lit_ft.cli.export import _parser


@pytest.fixture
def adapter(tiny_model_dir, tmp_path):
    from lit_ft.models import LoraSpec, ModelSpec, load_tokenizer
    from lit_ft.stages.sft import SFTModule

    torch.manual_seed(0)
    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0))
    module.configure_model()
    return module.save_adapter(tmp_path / "adapter", tokenizer=load_tokenizer(tiny_model_dir))


def _exit_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    last = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]  # after the export's own progress bars
    assert [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error:")] == [last]
    return last


def test_push_to_hub_is_parsed_for_adapter_and_merge_only(capsys):
    args = _parser().parse_args(["merge", "--adapter", "a", "--out", "m", "--push-to-hub", "me/sft-merged",
                                 "--private"])
    assert (args.push_to_hub, args.private) == ("me/sft-merged", True)
    args = _parser().parse_args(["adapter", "--ckpt", "c.ckpt", "--out", "a"])
    assert (args.push_to_hub, args.private) == (None, False)
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["adapter", "--ckpt", "c.ckpt", "--out", "a", "--push-to-hub"])
    assert info.value.code == 2 and "argument --push-to-hub: expected one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["gguf", "--src", "m", "--out", "m.gguf", "--push-to-hub", "me/x"])
    assert "unrecognized arguments: --push-to-hub me/x" in capsys.readouterr().err


def test_offline_push_is_refused_in_one_line_before_exporting(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in CI; huggingface_hub read it at import
    out = tmp_path / "merged"
    line = _exit_line(capsys, ["export", "merge", "--adapter", str(adapter), "--out", str(out),
                               "--push-to-hub", "me/sft-merged"])
    assert line == ("error: --push-to-hub me/sft-merged: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset "
                    "it, or export without --push-to-hub and upload the directory later (`hf upload REPO_ID DIR`)")
    assert not out.exists()  # refused before the merge ran


def test_bad_repo_id_and_missing_token_are_refused_in_one_line(adapter, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    line = _exit_line(capsys, ["export", "merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                               "--push-to-hub", "me/a/b"])
    assert line.startswith("error: --push-to-hub 'me/a/b': not a hub repository id (user/name): ")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if HF_HUB_OFFLINE were unset
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    line = _exit_line(capsys, ["export", "merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                               "--push-to-hub", "me/sft-merged"])
    assert line == ("error: --push-to-hub me/sft-merged: no Hugging Face token; set HF_TOKEN or run "
                    "`hf auth login`")
    assert not (tmp_path / "m").exists()


def test_unreachable_hub_is_one_line_and_the_export_stays(adapter, tmp_path, capsys, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    out = tmp_path / "merged"
    line = _exit_line(capsys, ["export", "merge", "--adapter", str(adapter), "--out", str(out),
                               "--push-to-hub", "me/sft-merged"])
    assert line.startswith("error: --push-to-hub me/sft-merged: upload failed (")
    assert line.endswith(f"); the export is in {out}")
    assert (out / "config.json").exists()  # the merge itself was written
