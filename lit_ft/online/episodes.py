"""Multi-turn rollouts against an environment: episodes that alternate the model's turns and the environment's.

An environment (`Environment`) is any object with ``reset(row) -> messages`` (the episode's starting conversation
from a prompt row: ``{"prompt": rendered prompt text, "answer": ...}``) and ``step(messages) -> (new_messages,
reward | None, done)`` (the conversation so far, ending with the model's turn: the environment's turns to append,
e.g. ``tool`` messages with the results of the calls, the episode's reward when it ends, and whether it ended); an
optional ``tools`` attribute (a list of JSON schemas) is passed to the chat template.

`rollout` runs the episodes of a batch together: each round, the token sequence of every unfinished episode (its
starting conversation rendered by the chat template with the tools and the generation prompt, then every turn's
tokens) is sampled as one left-padded batch through the `Sampler`; the model's text is parsed into an assistant
message (`TOOL_PARSERS`: the template's own tool-call format; a malformed call stays text, for the environment to
answer); the environment's turns are the text the chat template adds after the model's end-of-turn token, tokenized
and appended. The sequence the model sees next is the one the training forward sees, token for token. An episode
ends when the environment says so, after `max_turns` model turns, when its tokens reach `max_tokens`, or when a
model turn is cut without its end-of-turn token.

The episode is one row of the `Rollout`: the starting conversation is the prompt; the response holds every later
token, `attend` 1 on all of them and `mask` 1 on the model's own tokens only, so log-probs, the KL and the policy loss
see the model's tokens; `env_rewards` carries the episode's reward (0 where the environment gave none).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from lit_ft.data.templates import as_chat
from lit_ft.errors import ConfigError
from lit_ft.models import eval_mode
from lit_ft.online import sampler as decode
from lit_ft.online.batch import Rollout
from lit_ft.online.toolcalls import TOOL_PARSERS, assistant_message, tool_format
from lit_ft.train import strategies
from lit_ft.validation import check_spec


class Environment:
    """The base of what `model.environment` names (`{class_path: ..., init_args: ...}`, a subclass; jsonargparse
    instantiates it): override `reset` and `step` (module docstring); `tools`: the JSON schemas the chat template
    is given (None: none)."""

    tools: list[dict] | None = None

    def reset(self, row: dict) -> list[dict]:
        """The episode's starting conversation for a prompt row (`prompt`: the rendered prompt, `answer`)."""
        raise NotImplementedError

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]:
        """The conversation so far, ending with the model's turn -> (the environment's turns to append, the
        episode's reward or None, whether the episode ended)."""
        raise NotImplementedError


@dataclass
class EpisodeSpec:
    """Multi-turn episodes against `model.environment` (the `model.episodes` section)."""

    max_turns: int = 4
    """Model turns an episode takes at most (each followed by the environment's step)."""
    max_tokens: int = 1024
    """Tokens after the starting conversation an episode holds at most, the model's and the environment's together;
    each model turn samples at most `model.sampling.max_new_tokens` of them."""
    tool_format: Literal["auto", "hermes", "llama3_json"] = "auto"
    """How the model's tool calls are read from its text: `hermes` (Qwen2.5, Hermes, SmolLM3:
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), `llama3_json` (Llama 3.1/3.2: the whole turn one
    `{"name": ..., "parameters": {...}}` object, after `<|python_tag|>` or not); `auto`: from the chat template
    (`hermes` where it writes `<tool_call>`, `llama3_json` where it writes `<|python_tag|>` or `"parameters"`;
    `hermes` under `render_tools: hermes`)."""
    render_tools: Literal["template", "hermes"] = "template"
    """How the environment's tools, the model's calls and the tool results reach the chat template, as
    `data.tool_format` says for the data: `template` passes them as they are (a template that drops the tools is
    refused), `hermes` writes them into plain messages in the Hermes form first (`lit_ft.data.tools.hermes_messages`,
    the same function the DataModules render SFT rows with: what SFT trains on is what the episodes show)."""

    def __post_init__(self):
        check_spec(self, "model.episodes")
        if self.render_tools == "hermes" and self.tool_format == "llama3_json":
            raise ConfigError("model.episodes.render_tools='hermes' writes the calls as <tool_call> blocks, which "
                              "tool_format 'llama3_json' does not read; set tool_format auto or hermes")


def check_environment(env: Any, sampling) -> Any:
    """The environment object (a `{class_path, init_args}` dict, as a checkpoint stores it, is instantiated),
    refused in one line when it lacks `reset`/`step` or when the static engine was asked for."""
    if isinstance(env, dict):
        env = _instantiate(env)
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))
               or getattr(type(env), m, None) is getattr(Environment, m)]
    if missing:
        raise ConfigError(f"model.environment: {type(env).__name__} has no {' or '.join(missing)} method; an "
                          "environment needs reset(row) -> messages and step(messages) -> (messages, reward, done)")
    if getattr(sampling, "engine", "auto") == "static":
        raise ConfigError("model.sampling.engine='static': episodes against model.environment decode with the hf "
                          "engine (the static engine does not continue from a cached prefix yet); set auto or hf")
    return env


def _instantiate(spec: dict) -> Any:
    import importlib

    path = spec.get("class_path")
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"model.environment: expected {{class_path: module.Class, init_args: ...}}, got {spec!r}")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.environment.class_path={path!r}: cannot import it ({e})") from None
    return cls(**(spec.get("init_args") or {}))


def describe(env: Any) -> dict:
    """The environment as hparams.yaml keeps it (its class; init args are the config's)."""
    return {"class_path": f"{type(env).__module__}.{type(env).__qualname__}"}


# ---------------------------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    messages: list[dict]
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)  # 1: the model's token, 0: the environment's
    logprobs: list[float] = field(default_factory=list)
    reward: float | None = None
    turns: int = 0
    called: bool = False
    done: bool = False


def render(tokenizer, messages: list[dict], tools, generation: bool, render_tools: str = "template") -> str:
    """The conversation as the chat template renders it (`render_tools` hermes: through
    `lit_ft.data.templates.as_chat`, as the DataModules render rows under `data.tool_format` hermes)."""
    messages, tools = as_chat(messages, tokenizer, tools, render_tools)
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)


def environment_text(tokenizer, before: list[dict], new: list[dict], tools, render_tools: str = "template") -> str:
    """The text the chat template adds after the model's end-of-turn token for the environment's `new` turns (and
    the next generation prompt): the rendering with them, less the rendering up to that token without them."""
    eos = tokenizer.eos_token
    prev = render(tokenizer, before, tools, False, render_tools)
    cut = prev.rfind(eos)
    full = render(tokenizer, before + new, tools, True, render_tools)
    if cut < 0 or not full.startswith(prev[:cut + len(eos)]):
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(f"model.environment: the chat template of {where} does not render a conversation as its "
                          f"earlier rendering plus the new turns (after the model's {eos!r}); episodes need a "
                          "template that only appends")
    return full[cut + len(eos):]


def check_tools(tokenizer, tools) -> None:
    """Refuse a chat template that leaves the environment's tool schemas out of the prompt (the model could not
    know them), as the DataModules refuse one for tool-calling rows."""
    text = render(tokenizer, [{"role": "user", "content": "probe"}], tools, True)
    for t in tools or []:
        name = (t.get("function") or t).get("name", "")
        if name not in text:
            where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise ConfigError(f"model.environment: the chat template of {where} ignores tools (a prompt rendered with "
                              f"the environment's tools leaves out {name!r}); give the tokenizer a chat template that "
                              "supports tool calling (as Qwen2.5's and Llama 3.1's do), or set "
                              "model.episodes.render_tools hermes (the tools, calls and results written into plain "
                              "messages in the Hermes form, as data.tool_format hermes renders SFT rows)")


@torch.no_grad()
def rollout(module, batch: dict, sampling, logprobs: bool = True) -> Rollout:
    """The episodes of `batch` (one a prompt row) against `module.environment`, batched round by round (module
    docstring); sets `module.episode_stats` (the `rollout/*` figures)."""
    env, spec, tok = module.environment, module.episodes, module.tokenizer
    tools = getattr(env, "tools", None)
    if tools and spec.render_tools == "template" and getattr(module, "tools_checked", None) is not tok:
        check_tools(tok, tools)
        module.tools_checked = tok
    device = batch["input_ids"].device
    if module.sampler is None:
        module.sampler = decode.Sampler(module.model, tok.eos_token_id, tok.pad_token_id)
    names = {"prompts": "prompt", "answers": "answer"}
    rows = [{names.get(k, k): v[i] for k, v in batch.items() if isinstance(v, list)}
            for i in range(len(batch["input_ids"]))]
    eps = play(module.sampler, tok, env, spec, rows, sampling, device,
               lambda: generation_mode(module.model, module._trainer))
    module.episode_stats = {
        "rollout/env_tokens_mean": torch.tensor([float(len(e.model) - sum(e.model)) for e in eps]).mean(),
        "rollout/turns_mean": torch.tensor([float(e.turns) for e in eps]).mean(),
        "rollout/tool_call_frac": torch.tensor([float(e.called) for e in eps]).mean()}
    module.episode_messages = [e.messages for e in eps]
    return _as_rollout(eps, tok.pad_token_id, device, logprobs)


@contextlib.contextmanager
def generation_mode(model, trainer):
    with eval_mode(model), strategies.for_generation(trainer):
        yield


def play(sampler, tok, env, spec: EpisodeSpec, rows: list[dict], sampling, device, generating=None) -> list[Episode]:
    """The episodes of `rows` (prompt rows: `prompt`, `answer`, ...) against `env`, every round one batched call of
    `sampler` (a `lit_ft.online.sampler.Sampler`, or anything called the same way) over the unfinished ones, inside
    `generating()` (a context manager; none: no context). `rollout` trains on them; the held-out evaluation of
    `lit_ft.HeldOutEpisodes` scores them."""
    tools = getattr(env, "tools", None)
    parser = TOOL_PARSERS[tool_format(tok, spec.tool_format, spec.render_tools)]
    eps = _start(env, tok, tools, rows, spec.render_tools)
    hf = replace(sampling, engine="hf")
    while live := [e for e in eps if not e.done]:
        # 1. One model turn of every unfinished episode, sampled as one batch.
        n = min(sampling.max_new_tokens, max(spec.max_tokens - len(e.tokens) for e in live))
        ids, mask = _left_padded([e.prompt + e.tokens for e in live], tok.pad_token_id, device)
        with generating() if generating is not None else contextlib.nullcontext():
            out, out_mask, lp = sampler(ids, mask, hf, max_new_tokens=n, logprobs=True)
        for i, e in enumerate(live):
            # 2. The environment answers each turn that ended (its step, then its turns as tokens).
            if _model_turn(e, out[i], out_mask[i], lp[i], spec, tok, parser):
                _environment_turn(e, env, spec, tok, tools)
    return eps


def _start(env, tok, tools, rows: list[dict], render_tools: str = "template") -> list[Episode]:
    """One episode a prompt row: the environment's starting conversation, rendered with the generation prompt as
    the episode's prompt tokens."""
    eps = []
    for r in rows:
        msgs = list(env.reset(r))
        eps.append(Episode(msgs, tok(render(tok, msgs, tools, True, render_tools),
                                     add_special_tokens=False)["input_ids"]))
    return eps


def _model_turn(e: Episode, out, out_mask, lp, spec: EpisodeSpec, tok, parser) -> bool:
    """Append a sampled model turn (its tokens, log-probs, parsed message) to the episode; False when it was cut
    by the token budget (the episode ends: no end of turn for the environment to follow)."""
    k = min(int(out_mask.sum()), spec.max_tokens - len(e.tokens))
    new = out[:k].tolist()
    e.tokens += new
    e.model += [1] * k
    e.logprobs += lp[:k].tolist()
    e.turns += 1
    ended = bool(new) and new[-1] == tok.eos_token_id
    msg, called = assistant_message(tok.decode(new[:-1] if ended else new, skip_special_tokens=False), parser)
    e.messages.append(msg)
    e.called |= called
    e.done = not ended
    return ended


def _environment_turn(e: Episode, env, spec: EpisodeSpec, tok, tools) -> None:
    """The environment's step after a model turn: its reward, whether the episode ends, else its turns appended as
    the tokens the chat template renders after the model's end of turn (masked out of the loss)."""
    step = env.step([dict(m) for m in e.messages])
    if not (isinstance(step, tuple) and len(step) == 3 and isinstance(step[0], list)):
        raise ConfigError(f"model.environment: {type(env).__name__}.step returned {type(step).__name__}; "
                          "expected (new messages: list, reward: float | None, done: bool)")
    turns, reward, done = step
    if reward is not None:
        e.reward = float(reward)
    if done or e.turns >= spec.max_turns:
        e.done = True
        return
    env_ids = tok(environment_text(tok, e.messages, list(turns), tools, spec.render_tools),
                  add_special_tokens=False)["input_ids"]
    if len(e.tokens) + len(env_ids) >= spec.max_tokens:  # no room left for a model turn
        e.done = True
        return
    e.messages.extend(turns)
    e.tokens += env_ids
    e.model += [0] * len(env_ids)
    e.logprobs += [0.0] * len(env_ids)


def _as_rollout(eps: list[Episode], pad: int, device, logprobs: bool) -> Rollout:
    """The episodes as one `Rollout`: the starting conversation is the prompt, every later token the response
    (`attend` 1 on all of them, `mask` 1 on the model's own), the episode's reward in `env_rewards`."""
    prompts, attention = _left_padded([e.prompt for e in eps], pad, device)
    R = max(1, max(len(e.tokens) for e in eps))
    responses = torch.full((len(eps), R), pad, dtype=torch.long, device=device)
    attend = torch.zeros(len(eps), R, dtype=torch.long, device=device)
    model_mask = torch.zeros_like(attend)
    sampler_lp = torch.zeros(len(eps), R, device=device)
    for i, e in enumerate(eps):
        t = len(e.tokens)
        responses[i, :t] = torch.tensor(e.tokens, dtype=torch.long)
        attend[i, :t] = 1
        model_mask[i, :t] = torch.tensor(e.model, dtype=torch.long)
        sampler_lp[i, :t] = torch.tensor(e.logprobs)
    return Rollout(prompts, attention, responses, model_mask, sampler_logprobs=sampler_lp if logprobs else None,
                   attend=attend, env_rewards=torch.tensor([e.reward or 0.0 for e in eps], device=device))


def _left_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def last_turn(ro: Rollout) -> list[list[int]]:
    """Each row's last run of model tokens (the model's final turn), the tokens the reward callable reads."""
    out = []
    for r, m in zip(ro.responses.tolist(), ro.mask.tolist()):
        end = max((j for j, v in enumerate(m) if v), default=-1)
        start = end
        while start > 0 and m[start - 1]:
            start -= 1
        out.append(r[start:end + 1] if end >= 0 else [])
    return out
