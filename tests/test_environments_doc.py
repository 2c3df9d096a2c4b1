"""docs/environments.md's example, run as written: its Python blocks (the environment class, then the GRPO fit from
Python) executed in order on a tiny random model (the page's `BASE = None` line pointed at it), in an empty
directory."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "environments.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 2 and "class WordLength(Environment)" in blocks[0] and "trainer.fit(" in blocks[1]
    assert "BASE = None  #" in blocks[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "my_envs"}
    exec(compile(blocks[0], f"{DOC}:block1", "exec"), namespace)
    exec(compile(blocks[1].replace("BASE = None  #", f"BASE = {tiny_model_dir!r}  #"), f"{DOC}:block2", "exec"),
         namespace)
    module, env = namespace["module"], namespace["module"].environment
    assert module.trainer.global_step >= 1 and module.counters["rollouts"] == 2
    episode = module.episode_messages[0]
    assert episode[0]["role"] == "user" and episode[0]["content"] in env.answers
    assert any(m["role"] == "assistant" for m in episode)
    # the environment's answers to a call, a bad call and a final answer
    q = episode[0]["content"]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "length", "arguments": {"word": "banana"}}}]}
    assert env.step([episode[0], call]) == ([{"role": "tool", "name": "length", "tool_call_id": "call_0",
                                              "content": "6"}], None, False)
    assert env.step([episode[0], {"role": "assistant", "content": "<tool_call>{oops"}])[1:] == (None, False)
    assert env.step([episode[0], {"role": "assistant", "content": f"It has {env.answers[q]} letters."}]) == (
        [], 1.0, True)
