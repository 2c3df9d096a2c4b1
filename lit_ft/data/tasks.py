"""The demo task: two-number arithmetic with a verifiable answer, its data generator, metric and reward.

Every example is written by the project from a seeded generator (`python -m lit_ft.data.tasks data/demo`), so the
answer of each prompt is known exactly: the SFT demo measures exact match on held-out prompts, the reward
model learns to prefer the correct answer over a plausible wrong one, and PPO can use `correctness_reward`
as a verifiable reward.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

QUESTION_STYLES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}.",
    "{a} {op} {b} = ?",
]


def make_problem(rng: random.Random) -> tuple[str, str, str]:
    """Return (question, worked response, answer) for a random two-digit addition or subtraction."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice(["+", "-"])
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    question = rng.choice(QUESTION_STYLES).format(a=a, op=op, b=b)
    return question, f"{a} {op} {b} = {result}", str(result)


WRONG_KINDS = ("near_miss", "wrong_operation")


def wrong_response(response: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """(a plausible wrong response, its kind). Half are near misses (off by one or ten, digits swapped), the slips
    a model that carries or borrows wrongly makes; half apply the other operation (a - b for a + b and vice
    versa), the slip of a model that misreads the question. The reward demo reports its accuracy per kind."""
    value = int(answer)
    left = response.rsplit("=", 1)[0]
    kind = rng.choice(WRONG_KINDS)
    if kind == "wrong_operation":
        a, op, b = left.split()
        wrong = int(a) - int(b) if op == "+" else int(a) + int(b)
        if wrong != value:
            return left + f"= {wrong}", kind
    candidates = {value + 1, value - 1, value + 10, value - 10, int(answer[::-1]) if len(answer) > 1 else value + 2}
    candidates.discard(value)
    return left + f"= {rng.choice(sorted(candidates))}", "near_miss"


def normalize_number(text) -> str | None:
    """One spelling of a number: commas and a trailing ".0" dropped ("1,200.50" -> "1200.5", "11.0" and 11 -> "11");
    None when `text` is not a number."""
    text = str(text).strip().replace(",", "").removeprefix("$")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d*)?|[-+]?\.\d+", text):
        return None
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("+-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "0" if number == "0" else sign + number


def extract_answer(text: str) -> str | None:
    """The last number in a response (normalised: `normalize_number`), or None."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def exact_match(response: str, answer) -> bool:
    """The response's last number equals the answer, as numbers are written either way ("11" / "11.0" / 11)."""
    expected = normalize_number(answer)
    return expected is not None and extract_answer(response) == expected


def correctness_reward(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """Verifiable reward for PPO: 1 for the correct final number, 0 otherwise (no answer: 0)."""
    return [float(a is not None and exact_match(r, a)) for r, a in zip(responses, answers)]


correctness_reward.usable_answer = lambda answer: normalize_number(answer) is not None
"""What the online stages check before the first step: an answer this reward can ever match (`online.shared`)."""


# ---------------------------------------------------------------------------------------------- the calculator tool
# The tool demo (`lit-ft demo --stages sft_tools,grpo_tools`): SFT on conversations that call `add` or `subtract`
# and answer from the result, then GRPO with `lit_ft.CalculatorEnvironment` executing the calls.


CALCULATOR_TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    for name in ("add", "subtract")]
"""The calculator's tools as JSON schemas (the rows' `tools` column and `CalculatorEnvironment.tools`), kept to the
name and parameters: on the CPU the schemas are most of every prompt's tokens (README "Tool use")."""

TOOL_SYSTEM = "Use the calculator for arithmetic."
"""The system message of the tool conversations and of the calculator environment's episodes."""

TOOL_OPS = {"+": "add", "-": "subtract"}


def calculate(name: str, arguments: dict) -> str:
    """A calculator call's result as text (`add`: a + b, `subtract`: a - b); a call it cannot run is an error text,
    never an exception (what the environment answers a bad call with)."""
    if name not in TOOL_OPS.values():
        return f"error: unknown tool {name!r}; the tools are add and subtract"
    try:
        a, b = (float(arguments[k]) for k in ("a", "b"))
    except (KeyError, TypeError, ValueError):
        return f"error: {name} takes two numbers, a and b; got {json.dumps(arguments)[:60]}"
    value = a + b if name == "add" else a - b
    return normalize_number(repr(value)) or str(value)


def tool_conversation(question: str, response: str, answer: str) -> dict:
    """One demo problem as a tool-calling row: the user's question, the assistant's call of `add`/`subtract` with the
    two numbers, the tool's result, and the final answer in the task's format (`a op b = result`)."""
    a, op, b = response.rsplit("=", 1)[0].split()
    call = {"id": "call_0", "type": "function",
            "function": {"name": TOOL_OPS[op], "arguments": {"a": int(a), "b": int(b)}}}
    return {"tools": CALCULATOR_TOOLS, "answer": answer, "messages": [
        {"role": "system", "content": TOOL_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "name": TOOL_OPS[op],
         "content": calculate(TOOL_OPS[op], call["function"]["arguments"])},
        {"role": "assistant", "content": response}]}


def generate(out_dir: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 1234,
             n_tools: tuple[int, int] = (400, 50)) -> None:
    """Write the demo's instruction, preference and prompt files (JSONL) into `out_dir`, and the tool conversations
    (`tools_train.jsonl`, `tools_val.jsonl`: the first `n_tools` problems of each split as `tool_conversation`s, so
    the held-out prompts stay held out)."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        while len(splits[split]) < n:
            q, resp, ans = make_problem(rng)
            if q in seen:  # no prompt appears in both splits
                continue
            seen.add(q)
            splits[split].append((q, resp, ans))
    for split, rows in splits.items():
        _write(out / f"sft_{split}.jsonl", [{"prompt": q, "completion": r, "answer": a} for q, r, a in rows])
        _write(
            out / f"pref_{split}.jsonl",
            [{"prompt": q, "chosen": r, "rejected": w, "kind": k} for q, r, a in rows for w, k in [wrong_response(r, a, rng)]],
        )
        _write(out / f"prompts_{split}.jsonl", [{"prompt": q, "answer": a} for q, _, a in rows])
        _write(out / f"tools_{split}.jsonl", [tool_conversation(q, r, a) for q, r, a in
                                              rows[: n_tools[split == "val"]]])


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def answer_match(generation: str, reference) -> bool:
    """Task-agnostic exact match: the final numbers agree when the reference has one, else the stripped texts."""
    reference = str(reference)
    ref = extract_answer(reference)
    if ref is None:
        return generation.strip() == reference.strip()
    return extract_answer(generation) == ref


# ---------------------------------------------------------------------------------------------- GSM8K
# GSM8K (Cobbe et al. 2021) solutions end with a line "#### <number>"; configs/recipes/grpo_gsm8k.yaml asks the
# policy to end its answer the same way and rewards the number after its last "####".

_GSM8K_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def gsm8k_number(text: str | None) -> str | None:
    """The number after the last "####" of a text, commas and a trailing ".0" removed ("1,200.00" -> "1200")."""
    found = _GSM8K_FINAL.findall(text or "")
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm8k_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """Verifiable GSM8K reward: 1 when the number after the response's last "####" equals the one after the
    reference solution's "####", else 0 (no "####" in the response: 0)."""
    return [float(a is not None and gsm8k_number(r) is not None and gsm8k_number(r) == gsm8k_number(str(a)))
            for r, a in zip(responses, answers)]


gsm8k_reward.usable_answer = lambda answer: gsm8k_number(str(answer)) is not None


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
