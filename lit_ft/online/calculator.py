"""The calculator environment of the tool demo (`lit-ft demo --stages sft_tools,grpo_tools`): an episode starts from
a demo arithmetic question; the model's `add`/`subtract` calls are executed (`lit_ft.data.tasks.calculate`), a bad
call (malformed, an unknown tool, missing numbers) is answered with an error message turn; the first turn without a
call is the answer, rewarded 1 when its last number is the question's answer (`lit_ft.data.tasks.exact_match`).

It lives in the online layer (it subclasses `lit_ft.online.episodes.Environment`); the task's data, tools and
metric stay in `lit_ft.data.tasks`, below it.
"""

from __future__ import annotations

from lit_ft.data.tasks import CALCULATOR_TOOLS, TOOL_SYSTEM, calculate, exact_match
from lit_ft.online.episodes import Environment


class CalculatorEnvironment(Environment):
    """`model.environment: {class_path: lit_ft.CalculatorEnvironment}` (or the `environment` of
    `lit_ft.HeldOutEpisodes`): prompt rows `{"prompt": question, "answer": number}` (the prompt as written, as
    `data.template: plain` renders it)."""

    tools = CALCULATOR_TOOLS

    def __init__(self, system_prompt: str = TOOL_SYSTEM):
        """
        Args:
            system_prompt: the episodes' system message (the tool demo's SFT rows have the same one).
        """
        self.system_prompt = system_prompt
        self.answers: dict[str, str] = {}

    def reset(self, row: dict) -> list[dict]:
        question = str(row["prompt"]).strip()
        self.answers[question] = row.get("answer")
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]:
        last = messages[-1]
        if last.get("tool_calls"):
            return [{"role": "tool", "name": c["function"]["name"], "tool_call_id": c.get("id", f"call_{i}"),
                     "content": calculate(c["function"]["name"], c["function"]["arguments"])}
                    for i, c in enumerate(last["tool_calls"])], None, False
        if "<tool_call>" in last["content"]:  # a call the parser could not read, passed on as text
            return [{"role": "tool", "name": "error", "content": "error: the call is not "
                     '<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> with JSON inside'}], None, False
        question = next(m["content"] for m in messages if m["role"] == "user")
        answer = self.answers.get(question)
        return [], float(answer is not None and exact_match(last["content"], answer)), True
