"""`lit-ft chat`: talk to a base model plus a trained adapter, with the tokens streamed as they are generated.

    lit-ft chat --adapter runs/sft/latest/adapter --prompt "What is 12 + 30?"   # one answer, then exit
    lit-ft chat --adapter runs/ppo/latest/adapter                               # a conversation (empty line ends)

The base is the one the adapter was trained on (its `lit_ft_base.json`), or `--base`; without `--adapter` the
base alone answers. Prompts go through the tokenizer's chat template, as in training with `template: chat`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lit_ft.errors import ConfigError


def load(adapter: str | None, base: str | None, dtype: str = "auto"):
    """(model in eval mode, tokenizer) for a base (None = the adapter's own base, or the bundled default) plus an
    optional causal-LM adapter."""
    from lit_ft.models.adapters import check_adapter_base, trained_base
    from lit_ft.models import ModelSpec, load_adapter, load_base, load_tokenizer

    if base is None and adapter is not None:
        base = trained_base(adapter)
    spec = ModelSpec(name_or_path=base, dtype=dtype)
    model = load_base(spec, "causal_lm")
    if adapter is not None:
        check_adapter_base(adapter, spec.identity(), "--adapter")
        model = load_adapter(model, adapter, "causal_lm", trainable=False)
    from pathlib import Path

    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()
    tok = load_tokenizer(adapter if has_tokenizer else base)
    return model.eval(), tok


def trained_system_prompt(adapter: str | None) -> str | None:
    """`data.system_prompt` of the run that exported `adapter` (the `config.yaml` LightningCLI saved in its run
    directory, read as plain YAML), or None where there is none."""
    import yaml
    from pathlib import Path

    config = Path(adapter).parent / "config.yaml" if adapter else None
    if config is None or not config.is_file():
        return None
    try:
        data = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    for key in ("data", "init_args", "system_prompt"):
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, str) else None


def reply(model, tok, messages: list[dict], max_new_tokens: int, temperature: float, stream: bool = True) -> str:
    """Generate the assistant's next turn for `messages`, printing the tokens as they come when `stream`."""
    from transformers import TextStreamer

    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model without a template: the plain conversation text
        text = "\n".join(m["content"] for m in messages) + "\n"
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, streamer=streamer, **sampling)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lit-ft chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="a causal-LM adapter directory (an SFT or PPO export)")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's, else the bundled one)")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    parser.add_argument("--system", default=None,
                        help="a system prompt (default: the one the adapter's run trained with, from its config.yaml)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={args.max_new_tokens}: expected an integer >= 1")
    model, tok = load(args.adapter, args.base, args.dtype)
    system = args.system if args.system is not None else trained_system_prompt(args.adapter)
    if args.system is None and system is not None:
        print(f"(the system prompt the adapter was trained with: {system!r}; --system overrides it)", file=sys.stderr)
    history = [{"role": "system", "content": system}] if system is not None else []
    if args.prompt is not None:
        reply(model, tok, history + [{"role": "user", "content": args.prompt}], args.max_new_tokens,
              args.temperature)
        return
    print("(an empty line or Ctrl-D ends the chat)", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": reply(model, tok, history, args.max_new_tokens,
                                                               args.temperature)})
