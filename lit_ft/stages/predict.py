"""`predict_step` of the causal-LM stages: generations from a trained adapter, one dict a prompt, which
`lit_ft.callbacks.WritePredictions` writes and scores."""

from __future__ import annotations

from lit_ft.online.generation import SamplingSpec, generate

DEFAULT_SAMPLING = SamplingSpec(max_new_tokens=64, do_sample=False)


def predict_step(module, batch: dict, batch_idx: int) -> list[dict]:
    """Generate for one left-padded prompt batch (`PredictCollator`); one dict a prompt. The sampling settings are
    `module.predict_sampling` (set by `WritePredictions`), greedy with 64 new tokens without it."""
    tok = module.trainer.datamodule.tokenizer
    sampling = getattr(module, "predict_sampling", None) or DEFAULT_SAMPLING
    responses, _ = generate(module.model, batch["input_ids"], batch["attention_mask"], sampling,
                            tok.eos_token_id, tok.pad_token_id)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rows = []
    for i, text in enumerate(texts):
        row = {"line": batch.get("lines", [None] * len(texts))[i],
               "prompt": batch.get("sources", batch.get("prompts"))[i], "generation": text.strip()}
        answer = batch.get("answers", [None] * len(texts))[i]
        if answer is not None:
            row["answer"] = answer
        rows.append(row)
    return rows
