"""Multi-turn episodes against an environment (lit_ft.online.episodes) on a tiny random Llama with a Qwen-style tool
template: the masks token by token, the sampler's log-probs against the training forward's, malformed calls, a
GRPO fit with the environment, the settings refused."""

from __future__ import annotations

import pytest
import torch

from lit_ft.errors import ConfigError
from lit_ft.online import episodes, shared as online
from lit_ft.online.episodes import Environment, EpisodeSpec
from lit_ft.online.toolcalls import parse_hermes, parse_llama3_json
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.grpo import GRPOModule
from lit_ft.stages.grpo_spec import GRPOSpec
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from tests.test_data_tools import TOOL_TEMPLATE, TOOLS
from tests.test_ppo import adapters, one_thread, prompt_loader, trainer  # noqa: F401

ENV_TEXT = "\n<|im_start|>tool\n<tool_response>result 7</tool_response><|im_end|>\n<|im_start|>assistant\n"


def eos_biased_model(d: str, template: str | None = None) -> str:
    """A tiny random Llama in `d` that ends a turn often (its EOS logit raised by a constant direction of the last
    hidden state) and its tokenizer (with `template` as chat template when given); returns `d`."""
    from tests.conftest import make_tiny_llama, make_tokenizer

    tok = make_tokenizer(d)
    if template is not None:
        tok.chat_template = template
        tok.save_pretrained(d)
    model = make_tiny_llama(d, vocab_size=len(tok), mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.bias.zero_()
        model.model.layers[-1].mlp.down_proj.bias[0] = 0.2
        model.lm_head.weight[tok.eos_token_id] = 0
        model.lm_head.weight[tok.eos_token_id, 0] = 1.0
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """`eos_biased_model` with a Qwen-style tool template."""
    return eos_biased_model(str(tmp_path_factory.mktemp("tool_llama")), TOOL_TEMPLATE)


class Echo(Environment):
    """Never ends: every model turn is answered with one tool message."""

    tools = TOOLS

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"][-20:]}]

    def step(self, messages):
        return [{"role": "tool", "name": "add", "content": "result 7"}], None, False


class Calculator(Environment):
    """Answers `add` calls with their sum, a malformed call with an error; the first plain answer ends the episode
    with reward 1 when it holds 5."""

    tools = TOOLS

    def __init__(self):
        self.seen: list[list[dict]] = []

    def reset(self, row):
        return [{"role": "user", "content": "What is 2 plus 3?"}]

    def step(self, messages):
        self.seen.append(messages)
        last = messages[-1]
        if last.get("tool_calls"):
            out = [{"role": "tool", "name": c["function"]["name"], "tool_call_id": c["id"],
                    "content": str(sum(c["function"]["arguments"].values()))} for c in last["tool_calls"]]
            return out, None, False
        if "<tool_call>" in last["content"]:
            return [{"role": "tool", "name": "add", "content": "error: the call is not JSON"}], None, False
        return [], float("5" in last["content"]), True


class Again(Environment):
    """No tools: every model turn is answered by a user turn; the second model turn ends the episode with the share
    of upper-case letters in it as the reward."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"][-24:]}]

    def step(self, messages):
        if sum(m["role"] == "assistant" for m in messages) >= 2:
            text = messages[-1]["content"]
            return [], sum(c.isascii() and c.isupper() for c in text) / 8, True
        return [{"role": "user", "content": "Again."}], None, False


class NoStep(Environment):
    def reset(self, row):
        return []


def make_module(model_dir, environment, max_new=12, episodes_spec=None, **kw):
    return GRPOModule(base=ModelSpec(name_or_path=model_dir, dtype="float32"), reward_fn=kw.pop("reward_fn", None),
                      lora=LoraSpec(r=8, alpha=16, dropout=0.0), sampling=SamplingSpec(max_new_tokens=max_new),
                      grpo=kw.pop("grpo", GRPOSpec(samples_per_prompt=2, mini_batch_size=8)),
                      optim=OptimSpec(lr=1e-3, scheduler="constant", warmup_ratio=0.0), sample_table_every=0,
                      environment=environment, episodes=episodes_spec or EpisodeSpec(max_turns=3, max_tokens=200),
                      **kw)


def runs(mask_row) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of a 0/1 row."""
    out, start = [], 0
    for j in range(1, len(mask_row) + 1):
        if j == len(mask_row) or mask_row[j] != mask_row[start]:
            out.append((mask_row[start], start, j))
            start = j
    return out


def test_parsers():
    assert parse_hermes('Sure.<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') == (
        "Sure.", [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}])
    assert parse_hermes("5") == ("5", [])
    for bad in ('<tool_call>{"name": "add", "arguments": {"a": 2</tool_call>', '<tool_call>{"name": "add"}',
                '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "add", "arguments": 3}</tool_call>'):
        assert parse_hermes(bad) is None, bad
    assert parse_llama3_json('<|python_tag|>{"name": "add", "parameters": {"a": 1}}')[1][0]["function"] == {
        "name": "add", "arguments": {"a": 1}}
    assert parse_llama3_json("The answer is 5.") == ("The answer is 5.", [])
    assert parse_llama3_json('{"name": "add", "parameters": ') is None
    msg, called = episodes.assistant_message('<tool_call>{"name": "add"</tool_call>', parse_hermes)
    assert msg == {"role": "assistant", "content": '<tool_call>{"name": "add"</tool_call>'} and not called


def test_masks_and_logprobs_token_by_token(tool_model_dir):
    """Model tokens are exactly what the sampler drew (mask 1), environment tokens exactly the template's text for
    the environment's turns (mask 0, attended); the training forward's log-probs of the model tokens equal the
    sampler's with environment tokens between the turns."""
    torch.manual_seed(0)
    module = make_module(tool_model_dir, Echo(), reward_fn="tests.test_ppo.uppercase_share")
    module.configure_model()
    tok = module.tokenizer
    drawn = []
    real = online.decode.Sampler(module.model, tok.eos_token_id, tok.pad_token_id)

    def recording(ids, mask, spec, max_new_tokens=None, logprobs=False):
        out = real(ids, mask, spec, max_new_tokens=max_new_tokens, logprobs=logprobs)
        drawn.append([r[m.bool()].tolist() for r, m in zip(out[0], out[1])])
        return out

    module.sampler = recording
    batch = online.repeat_prompts(next(iter(prompt_loader(tok, batch_size=4))), 2)
    ro = module.rollout(batch, module.sampling)
    assert ro.attend is not None and ro.env_rewards.tolist() == [0.0] * 8
    with_env = 0
    for i in range(8):
        row = ro.responses[i].tolist()
        segs = [s for s in runs((ro.mask[i] + ro.attend[i]).tolist()) if s[0] > 0]  # 2: model, 1: environment
        model_segs = [row[a:b] for v, a, b in segs if v == 2]
        assert all(v in (1, 2) for v, _, _ in segs)
        for v, a, b in segs:
            if v == 1:
                assert tok.decode(row[a:b]) == ENV_TEXT
                with_env += 1
        assert len(model_segs) <= module.episodes.max_turns
        assert sum(len(s) for s in model_segs) == int(ro.mask[i].sum())
    assert with_env > 0, "no episode reached a second turn: the fixture's EOS bias is too weak"
    # every model segment is one of the sampler's draws of its round
    flat = [tuple(d) for round_draws in drawn for d in round_draws]
    for i in range(8):
        row = ro.responses[i].tolist()
        for v, a, b in runs(ro.mask[i].tolist()):
            if v == 1:
                assert tuple(row[a:b]) in flat
    assert float(module.episode_stats["rollout/env_tokens_mean"]) == float((ro.attend - ro.mask).sum(1).float().mean())
    assert float(module.episode_stats["rollout/turns_mean"]) > 1
    # log-probs of the model tokens under the training forward (fp32) equal the sampler's
    online.old_and_ref_logprobs(module, ro, 8, reference=False)
    m = ro.mask.bool()
    assert torch.allclose(ro.old_logprobs[m], ro.sampler_logprobs[m], atol=1e-5), \
        (ro.old_logprobs[m] - ro.sampler_logprobs[m]).abs().max()
    assert (ro.old_logprobs[~m] == 0).all() and (ro.sampler_logprobs[~m] == 0).all()


class Scripted:
    """A sampler that answers every round with the same scripted text for every episode (then EOS)."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.round = tok, texts, 0

    def __call__(self, ids, mask, spec, max_new_tokens=None, logprobs=False):
        t = self.tok(self.texts[self.round], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        self.round += 1
        out = torch.tensor([t] * len(ids))
        return out, torch.ones_like(out), torch.full(out.shape, -1.0)


def test_malformed_call_reaches_the_environment_and_the_episode_goes_on(tool_model_dir):
    env = Calculator()
    module = make_module(tool_model_dir, env, max_new=200, episodes_spec=EpisodeSpec(max_turns=4, max_tokens=1000))
    module.configure_model()
    tok = module.tokenizer
    bad = '<tool_call>{"name": "add", "arguments": {"a": 2</tool_call>'
    good = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    module.sampler = Scripted(tok, [bad, good, "It is 5."])
    batch = next(iter(prompt_loader(tok, batch_size=2)))
    ro = module.rollout(batch, module.sampling)
    assert module.sampler.round == 3
    assert len(env.seen) == 6 and env.seen[0][-1] == {"role": "assistant", "content": bad}  # passed on as text
    assert env.seen[4][-2]["content"] == "5" and env.seen[4][-3]["tool_calls"][0]["function"]["arguments"] == \
        {"a": 2, "b": 3}
    assert ro.env_rewards.tolist() == [1.0, 1.0]
    assert module.episode_stats["rollout/turns_mean"] == 3 and module.episode_stats["rollout/tool_call_frac"] == 1
    env_text = tok.decode(ro.responses[0][(ro.attend[0] - ro.mask[0]).bool()])
    assert "error: the call is not JSON" in env_text and "<tool_response>5</tool_response>" in env_text
    scores, texts, parts = module.score(batch, ro)
    assert texts == ["It is 5."] * 2 and scores.tolist() == [1.0, 1.0]
    assert float(parts["no_eos"]) == 0
    ro.mask[0, int(ro.mask[0].nonzero().max())] = 0  # the final turn's EOS gone: cut
    assert online.no_eos(module, ro).tolist() == [True, False]


def test_grpo_fit_with_an_environment_logs_the_episode_figures(tool_model_dir):
    torch.manual_seed(0)
    module = make_module(tool_model_dir, Echo(), reward_fn="tests.test_ppo.uppercase_share")
    module.configure_model()
    trainer(2, limit_val_batches=1).fit(module, train_dataloaders=prompt_loader(module.tokenizer, batch_size=4, n=8),
                                        val_dataloaders=prompt_loader(module.tokenizer, batch_size=4, n=4))
    m = module.trainer.callback_metrics
    for k in ("rollout/env_tokens_mean", "rollout/turns_mean", "rollout/tool_call_frac",
              "train/rewards/environment/mean", "train/loss", "val/scores", "val/environment"):
        assert k in m, k
    assert module.counters["rollouts"] == 2 and float(m["rollout/env_tokens_mean"]) > 0
    assert float(m["rollout/logprob_diff_max"]) < 1e-5  # the update's own log-probs of the model tokens


def test_bad_settings(tool_model_dir):
    with pytest.raises(ConfigError, match=r"^model.episodes.max_turns=0: expected an integer >= 1"):
        EpisodeSpec(max_turns=0)
    with pytest.raises(ConfigError) as info:
        make_module(tool_model_dir, NoStep())
    assert str(info.value) == ("model.environment: NoStep has no step method; an environment needs reset(row) -> "
                               "messages and step(messages) -> (messages, reward, done)")
    with pytest.raises(ConfigError, match=r"model.sampling.engine='static': episodes against model.environment"):
        GRPOModule(base=ModelSpec(name_or_path=tool_model_dir), sampling=SamplingSpec(engine="static"),
                   environment=Echo())
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GRPOModule, "model", sub_configs=True)
    cfg = parser.parse_args(["--model.base.name_or_path", tool_model_dir, "--model.environment",
                             '{"class_path": "tests.test_episodes.Calculator"}', "--model.episodes.max_turns", "2"])
    module = parser.instantiate_classes(cfg).model
    assert isinstance(module.environment, Calculator) and module.episodes.max_turns == 2 and module.reward_fn is None
    module = make_module(tool_model_dir, {"class_path": "tests.test_episodes.Echo"})
    assert isinstance(module.environment, Echo) and module.hparams["environment"] == {
        "class_path": "tests.test_episodes.Echo"}


def test_template_without_tools_is_refused(tiny_model_dir):
    module = make_module(tiny_model_dir, Echo())
    module.configure_model()
    with pytest.raises(ConfigError) as info:
        module.rollout(next(iter(prompt_loader(module.tokenizer, batch_size=2))), module.sampling)
    assert str(info.value) == (
        f"model.environment: the chat template of {tiny_model_dir} ignores tools (a prompt rendered with the "
        "environment's tools leaves out 'add'); give the tokenizer a chat template that supports tool calling (as "
        "Qwen2.5's and Llama 3.1's do), or set model.episodes.render_tools hermes (the tools, calls and results "
        "written into plain messages in the Hermes form, as data.tool_format hermes renders SFT rows)")


def test_reward_adapter_reads_the_whole_conversation(tiny_model_dir, adapters):
    """With a reward adapter, the episode is scored on every response token, the environment's included."""
    from lit_ft.online import roles

    module = make_module(tiny_model_dir, Again(), reward_adapter=adapters[1], max_new=64)
    module.configure_model()
    module.sampler = Scripted(module.tokenizer, ["Hello.", "HELLO."])
    batch = next(iter(prompt_loader(module.tokenizer, batch_size=2)))
    ro = module.rollout(batch, module.sampling)
    assert (ro.attend - ro.mask).sum() > 0 and ro.env_rewards.tolist() == [0.625, 0.625]
    scores, texts, parts = module.score(batch, ro)
    ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.attend)
    with torch.no_grad(), module.roles.active(roles.REWARD):
        raw = roles.last_token_scores(module.reward_head, roles.trunk(module.model, ids, mask, pos), mask)
    expected = raw * module.reward_norm[0] + module.reward_norm[1]
    assert torch.allclose(parts["reward_model"], expected.mean()) and texts == ["HELLO."] * 2
    assert torch.allclose(scores, expected + ro.env_rewards)


# ---------------------------------------------------------------------------------------------- render_tools: hermes


def test_hermes_episode_on_a_template_without_tools_is_what_sft_trains_on(tiny_model_dir):
    """render_tools hermes on the tiny model (its ChatML template ignores tools): the episode's tokens are, token for
    token, the SFT rendering of the same conversation under data.tool_format hermes; the environment's tokens (the
    tool result and the next generation prompt) are masked, the model's calls and answer are not."""
    from lit_ft.data.templates import render_segments
    from lit_ft.data.tools import hermes_call

    env = Calculator()
    module = make_module(tiny_model_dir, env, max_new=200,
                         episodes_spec=EpisodeSpec(max_turns=3, max_tokens=1000, render_tools="hermes"))
    module.configure_model()
    tok = module.tokenizer
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    module.sampler = Scripted(tok, [hermes_call(call), "It is 5."])
    batch = next(iter(prompt_loader(tok, batch_size=2)))
    ro = module.rollout(batch, module.sampling)
    assert ro.env_rewards.tolist() == [1.0, 1.0] and module.episode_stats["rollout/tool_call_frac"] == 1
    conversation = [{"role": "user", "content": "What is 2 plus 3?"},
                    {"role": "assistant", "content": "", "tool_calls": [dict(call, id="call_0")]},
                    {"role": "tool", "name": "add", "tool_call_id": "call_0", "content": "5"},
                    {"role": "assistant", "content": "It is 5."}]
    segments = render_segments(conversation, tok, "chat", None, tools=TOOLS, tool_format="hermes")
    sft, want = [], []  # SFT's tokens and which of them the model wrote: a trained turn up to its end-of-turn token
    for text, trained in segments:
        seg = tok(text, add_special_tokens=False)["input_ids"]
        end = seg.index(tok.eos_token_id) + 1 if trained else 0
        sft += seg
        want += [1] * end + [0] * (len(seg) - end)
    for i in range(2):
        prompt = ro.input_ids[i][ro.attention_mask[i].bool()].tolist()
        response = ro.responses[i][ro.attend[i].bool()].tolist()
        n = len(prompt) + len(response)
        assert prompt + response == sft[:n] and tok.decode(sft[n:]) == "\n"  # SFT's tokens, token for token
        assert [0] * len(prompt) + ro.mask[i][ro.attend[i].bool()].tolist() == want[:n]
    env_text = tok.decode(ro.responses[0][(ro.attend[0] - ro.mask[0]).bool()])
    assert env_text == "\n<|im_start|>tool\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert "<tools>" in tok.decode(ro.input_ids[0]) and episodes.tool_format(tok, "auto", "hermes") == "hermes"


def test_calculator_environment():
    from lit_ft.online.calculator import CalculatorEnvironment

    env = CalculatorEnvironment()
    start = env.reset({"prompt": "What is 12 + 30?", "answer": "42"})
    assert start[1] == {"role": "user", "content": "What is 12 + 30?"} and start[0]["role"] == "system"

    def call(name, **arguments):
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_0", "function": {"name": name, "arguments": arguments}}]}

    for message, result in [(call("add", a=12, b=30), "42"), (call("subtract", a=12, b=30), "-18"),
                            (call("mul", a=2, b=3), "error: unknown tool 'mul'; the tools are add and subtract"),
                            (call("add", a=1), 'error: add takes two numbers, a and b; got {"a": 1}'),
                            (call("add", a="x", b=2), 'error: add takes two numbers, a and b; got {"a": "x", "b": 2}')]:
        turns, reward, done = env.step(start + [message])
        assert (turns[0]["content"], reward, done) == (result, None, False)
    turns, reward, done = env.step(start + [{"role": "assistant", "content": '<tool_call>{"name": "add"</tool_call>'}])
    assert turns[0]["content"].startswith("error: the call is not") and not done
    assert env.step(start + [{"role": "assistant", "content": "12 + 30 = 42"}]) == ([], 1.0, True)
    assert env.step(start + [{"role": "assistant", "content": "12 + 30 = 41"}]) == ([], 0.0, True)
