"""The built wheel, installed into a fresh venv, is a working `lit-ft` command from any directory (issue 22).

The wheel is built offline from a copy of the checkout and installed without its dependencies into a new venv
that sees the already-installed ones through a `.pth` line (never the checkout: PYTHONPATH is cleared). From an
empty directory it trains with the shipped `sft` recipe on the shipped demo data (the tiny model swapped in),
then predicts and exports from the run's checkpoint (`test` and the run layout: tests/test_tool.py).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "wandb", "lightning_logs", "__pycache__",
                               "*.egg-info", ".pytest_cache", "benchmarks", ".lit_ft.lock")


def _run(cmd, cwd, env, timeout=300):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, env) with lit_ft installed from its wheel."""
    tmp = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO, tmp / "src", ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(tmp / "src")], tmp, env)
    wheel = next((tmp / "dist").glob("lit_ft-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], tmp, env)
    venv_python = tmp / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "-q", "--no-index", "--no-deps",
          str(wheel)], tmp, env)
    purelib = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies already installed here, as plain path entries: the checkout's editable hook is not run.
    Path(purelib, "_lit_ft_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return tmp / "venv" / "bin", env, wheel


def test_wheel_holds_the_recipes_the_demo_data_and_the_command(installed):
    import zipfile

    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = Path(__file__).resolve().parents[1] / "configs"
    shipped = {f"lit_ft/configs/{p.relative_to(configs)}" for p in configs.rglob("*.yaml")}
    assert len(shipped) > 20 and not shipped - names, sorted(shipped - names)  # every recipe, folders included
    for data in ("sft_train", "sft_val", "pref_train", "pref_val", "prompts_train", "prompts_val"):
        assert f"lit_ft/demo_data/{data}.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lit-ft = lit_ft.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if "llm" in r]  # no extra pulls the llm CLI and llama-cpp-python in


def test_fit_predict_export_from_an_empty_directory(installed, tmp_path):
    from tests.conftest import make_tiny_llama, make_tokenizer

    bin_dir, env, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    tok = make_tokenizer(str(work / "tiny"))
    make_tiny_llama(str(work / "tiny"), vocab_size=len(tok))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n"
                               for a in range(5)))
    lit_ft = str(bin_dir / "lit-ft")
    where = _run([str(bin_dir / "python"), "-c", "import lit_ft; print(lit_ft.__file__)"], work, env).stdout
    assert str(bin_dir.parent) in where, where  # the installed copy, not the checkout

    small = ["--model.init_args.base.name_or_path", "tiny", "--trainer.logger", "false",
             "--model.init_args.lora", "{r: 4, alpha: 8, dropout: 0.0}", "--data.init_args.max_length", "64"]
    fit = _run([lit_ft, "fit", "--config", "sft", *small, "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "1"], work, env)
    run = work / "runs" / "sft" / "version_0"
    assert (work / "runs" / "sft" / "latest").resolve() == run.resolve()
    for part in ("config.yaml", "checkpoints/last.ckpt", "adapter/adapter_config.json", "adapter/README.md"):
        assert (run / part).exists(), (part, fit.stderr[-2000:])
    assert "[end] step 2" in fit.stdout + fit.stderr

    _run([lit_ft, "predict", "--config", "sft", *small, "--ckpt_path", "last",
          "--data.init_args.predict_file", str(prompts)], work, env)
    rows = [json.loads(x) for x in (work / "runs/sft/predict_0/predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"What is {a} + 2?" for a in range(5)]
    assert all(isinstance(r["generation"], str) and r["correct"] in (0.0, 1.0) for r in rows)

    _run([lit_ft, "export", "adapter", "--ckpt", "runs/sft/latest/checkpoints/last.ckpt", "--out", "exported"],
         work, env)
    from safetensors.torch import load_file

    mine = load_file(work / "exported" / "adapter_model.safetensors")
    fits = load_file(run / "adapter" / "adapter_model.safetensors")
    assert mine.keys() == fits.keys() and mine
    assert all(torch.equal(mine[k], fits[k]) for k in mine)
    assert (work / "exported" / "README.md").read_text().startswith("---\nbase_model: tiny\n")


def test_help_lists_commands_and_recipes_and_plan_is_wired(installed, tmp_path):
    bin_dir, env, _ = installed
    out = _run([str(bin_dir / "lit-ft"), "--help"], tmp_path, env).stdout
    for word in ("fit", "validate", "test", "predict", "export", "chat", "plan", "demo", "sft", "reward", "ppo"):
        assert word in out
    module = _run([str(bin_dir / "python"), "-m", "lit_ft", "--help"], tmp_path, env).stdout
    assert module == out
