"""The HH-RLHF text format (Anthropic's Helpful and Harmless pairs): ``"\n\nHuman: ...\n\nAssistant: ..."``
conversations, a pair sharing everything up to its last assistant turn. `split_hh` cuts a pair into the shared
prompt and the two responses, `hh_turns` reads the prompt's turns, and `prompt_for` says what a template renders: the
turns for the chat template, the text as written for the text templates, where the speaker markers are the only
record of who said what. `lit_ft.data.records` builds the records from these.
"""

from __future__ import annotations

import os
import re

from lit_ft.data.readers import RowError

HH_MARKER = "\n\nAssistant:"
HH_SPEAKERS = {"Human": "user", "Assistant": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(transcript: str) -> list[dict]:
    """An HH-RLHF prompt (``"\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"``) as chat messages
    (user a, assistant b, user c). Text before the first marker is the user's; a speaker who talks twice in a row
    (it happens in HH) is one turn, the parts joined by a blank line."""
    parts = _HH_TURN.split(transcript)
    turns: list[dict] = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = HH_SPEAKERS[speaker], content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = (turns[-1]["content"] + "\n\n" + content).strip()
        else:
            turns.append({"role": role, "content": content})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # the prompt's closing "Assistant:", where the responses start
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
        raise RowError("chosen", "expected HH-RLHF turns starting with 'Human:' and a 'Human:' turn right before "
                                 "the responses")
    if any(not t["content"] for t in turns):
        raise RowError("chosen", "an HH-RLHF turn with no text")
    return turns


def prompt_for(record: dict, template: str) -> list[dict]:
    """The prompt messages a template renders: an HH-RLHF row's turns for the chat template, its text as written
    (one user message) for the text templates."""
    transcript = record.get("transcript")
    if transcript is None or template == "chat":
        return record["prompt"]
    return [{"role": "user", "content": transcript}]


def response_for(record: dict, text: str, template: str) -> str:
    """A response as a template renders it: an HH-RLHF response loses the space that follows ``Assistant:`` under
    the chat template (there the turn's markup separates it, and a policy's sampled answer has no such space), and
    stays as written under the text templates, where it continues the transcript."""
    return text.lstrip() if template == "chat" and "transcript" in record else text


def messages_for(record: dict, template: str) -> list[dict]:
    """An instruction record's messages as a template renders them; for the chosen side of an HH-RLHF pair, the
    prompt per `prompt_for` and the answer per `response_for`."""
    if "transcript" not in record:
        return record["messages"]
    answer = record["messages"][-1]["content"]
    prompt = prompt_for({"prompt": record["messages"][:-1], "transcript": record["transcript"]}, template)
    return prompt + [{"role": "assistant", "content": response_for(record, answer, template)}]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF style conversations into (prompt, chosen, rejected) at the last shared Assistant marker."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_MARKER)
    if cut < 0:
        raise RowError("chosen", f"no shared prefix ending in {HH_MARKER!r} between chosen and rejected; "
                                 "expected HH-RLHF style '\\n\\nHuman: ...\\n\\nAssistant: ...' text or a prompt field")
    end = cut + len(HH_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]
