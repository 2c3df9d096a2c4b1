"""Export a trained adapter, merge it into the base weights, or convert either to GGUF (llama.cpp, Ollama).

    # adapter from a Lightning checkpoint (trainable state only) -> PEFT directory (with a README model card)
    lit-ft export adapter --ckpt runs/sft/latest/checkpoints/last.ckpt --out sft_adapter
    # adapter merged into a plain HF model directory (AutoModelForCausalLM.from_pretrained loads it)
    lit-ft export merge --adapter runs/sft/latest/adapter --out sft_merged
    # GGUF through llama.cpp's converters (needs the gguf package and a llama.cpp checkout: --llama_cpp DIR)
    lit-ft export gguf --src sft_merged --out sft.gguf              # a merged model -> a full GGUF model
    lit-ft export gguf --src runs/sft/latest/adapter --out sft-lora.gguf   # an adapter -> a GGUF LoRA

`python -m lit_ft export ...` is the same command. `adapter` and `merge` take `--push-to-hub REPO_ID` (and
`--private`): the written directory is uploaded with huggingface_hub when online and a token is set (checked before
anything is exported).

A base that was trained quantized (4-bit/8-bit) is merged into a de-quantized copy of the base: the merged
model is a normal float checkpoint, not a quantized one.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from lit_ft.errors import ConfigError, loading
from lit_ft.train.outputs import atomic_directory, check_output

# Light at import (no torch): every refusal of a path or a name comes in a fraction of a second; the model layers are
# imported inside the functions that use them.

# The only classes an export builds from a checkpoint's `lit_ft_module` entry: a checkpoint cannot name any other
# callable to be imported or called. A checkpoint records `lit_ft.<Name>`; one written before the subpackages
# records the module path of then (`lit_ft.sft.SFTModule`), one written in between today's (`lit_ft.stages.sft...`).
MODULE_NAMES = ("SFTModule", "RewardModule", "PPOModule", "DPOModule", "GRPOModule", "KTOModule")


def _recorded_paths() -> dict[str, str]:
    """Every path a checkpoint may record for an allowed class -> the class's public name."""
    import lit_ft

    paths = {}
    for name in MODULE_NAMES:
        module = lit_ft._EXPORTS[name]
        olds = [old for old, new in lit_ft.MOVED.items() if new == module]
        for path in (f"lit_ft.{name}", f"{module}.{name}", *(f"{old}.{name}" for old in olds)):
            paths[path] = name
    return paths


MODULE_CLASSES = _recorded_paths()


def load_checkpoint(ckpt: str | Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain values only, never pickled code (a checkpoint from
    an untrusted source cannot run anything); a file holding pickled objects is refused with a ConfigError, a
    truncated or corrupted one with a CheckpointError naming the newest checkpoint beside it that verifies."""
    if not Path(ckpt).is_file():
        raise ConfigError(f"--ckpt: {ckpt} is not a file")
    from lit_ft.train.integrity import load_verified

    return load_verified(ckpt)


def adapter_from_checkpoint(ckpt: str | Path, out: str | Path, tokenizer: str | None = None,
                            base: str | None = None, overwrite: bool = False) -> Path:
    """Rebuild the LightningModule recorded in a lit_ft checkpoint, load its trainable state, save the adapter.

    The checkpoint's settings shape the module (LoRA rank, targets, heads), but never run code: model code shipped
    with a base (`trust_remote_code`) stays off whatever the checkpoint says, and `base` loads the base from
    another place than the one recorded (its weights must be the ones the checkpoint was trained on)."""
    check_output(out, "--out", inputs=(ckpt,), overwrite=overwrite)
    from lit_ft.models import DEFAULT_MODEL_NAME, ModelSpec, load_tokenizer, restore_start
    from lit_ft.models.identity import identity_diff
    from lit_ft.train.checkpointing import IDENTITY_KEY, MODULE_KEY, START_KEY

    state = load_checkpoint(ckpt)
    if MODULE_KEY not in state:
        raise ConfigError(f"{ckpt} is not a lit_ft checkpoint (no '{MODULE_KEY}' entry)")
    cls = module_class(state[MODULE_KEY], ckpt)
    hparams = dict(state.get("hyper_parameters") or {})
    spec = dict(hparams.get("base") or {}, trust_remote_code=False)
    if base is not None:
        spec["name_or_path"] = base
        recorded = state.get(IDENTITY_KEY) or {}
        if identity_diff(recorded, ModelSpec(name_or_path=base).identity(), keys=("weights",)):
            raise ConfigError(f"--base {base}: other weights than the checkpoint's base ({recorded.get('name_or_path')})")
    hparams["base"] = spec
    module = cls(**init_arguments(cls, hparams))
    module.configure_model()
    missing = set(state["state_dict"]) - set(module.state_dict())
    if missing:
        raise ConfigError(f"{ckpt} holds tensors this module does not have, e.g. {sorted(missing)[:3]}")
    module.load_state_dict(state["state_dict"], strict=False)
    restore_start(module.model, state.get(START_KEY))  # a PiSSA/OLoRA run: the residual its adapter trained against
    base_name = tokenizer or base or state[IDENTITY_KEY]["name_or_path"]
    tok = load_tokenizer(None if base_name == DEFAULT_MODEL_NAME else base_name)
    with atomic_directory(out) as tmp:  # a kill during the export leaves no partial directory
        module.save_adapter(tmp, tokenizer=tok)
    return Path(out)


def module_class(name: str, ckpt) -> type:
    """The LightningModule class a checkpoint names, from `MODULE_CLASSES` only (checked before any import)."""
    if not isinstance(name, str) or name not in MODULE_CLASSES:
        from lit_ft.train.checkpointing import MODULE_KEY

        raise ConfigError(f"{ckpt}: refused: its '{MODULE_KEY}' entry names {name!r}, which is not one of lit_ft's "
                          f"modules ({', '.join(f'lit_ft.{n}' for n in MODULE_NAMES)}); nothing was imported or called")
    import lit_ft

    return getattr(lit_ft, MODULE_CLASSES[name])


def init_arguments(cls: type, hparams: dict) -> dict:
    """The hyper-parameters that are arguments of `cls.__init__`: LightningCLI also stores `_class_path` and
    `_instantiator` among them, and an older or newer checkpoint may hold settings this version does not know."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hparams.items() if k in params and k != "self"}


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "float32",
          attn_implementation: str = "auto", overwrite: bool = False) -> Path:
    """Merge LoRA weights into the base (`merge_and_unload`) and save a plain HF model + tokenizer.

    `attn_implementation` is how the base loads for the merge (`auto`: what transformers picks for the family,
    so families that refuse SDPA, such as Gemma 2, merge too); the saved model records none of it."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there (an adapter directory is what "
                          "ExportAdapter or `lit-ft export adapter` writes)")
    check_output(out, "--out", inputs=(adapter, base if base and Path(base).exists() else None), overwrite=overwrite)
    from peft import PeftModel

    from lit_ft.models import DEFAULT_MODEL_NAME, ModelSpec, load_base, load_tokenizer
    from lit_ft.models.adapters import check_adapter_base, read_base_identity
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    identity = read_base_identity(adapter) or {}
    name = base or identity.get("name_or_path") or cfg.get("base_model_name_or_path")
    spec = ModelSpec(name_or_path=None if name == DEFAULT_MODEL_NAME else name, dtype=dtype)
    if identity.get("quantization", "none") != "none":
        print(f"note: trained on a {identity['quantization']} base; merging into a de-quantized {dtype} copy")
    check_adapter_base(adapter, spec.identity(), "--adapter")
    task = "score" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
    spec.attn_implementation = attn_implementation
    with loading(adapter, "--adapter"):
        model = PeftModel.from_pretrained(load_base(spec, task), str(adapter)).merge_and_unload()
    tok = load_tokenizer(str(adapter)) if (adapter / "tokenizer_config.json").exists() else load_tokenizer(spec.name_or_path)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)


def check_hub_target(repo_id: str) -> None:
    """Refuse `--push-to-hub` before exporting when the upload cannot work: a bad repo id, offline mode, no token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub {repo_id!r}: not a hub repository id (user/name): {e}") from None
    if constants.is_offline_mode():
        raise ConfigError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, "
                          "or export without --push-to-hub and upload the directory later (`hf upload REPO_ID DIR`)")
    if not get_token():
        raise ConfigError(f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported directory (adapter or merged model) to the hub model repository `repo_id`, creating it if
    needed; returns the commit URL. A failed upload is one line naming the setting (the export stays on disk)."""
    from huggingface_hub import HfApi

    check_hub_target(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=f"lit_ft export of {Path(folder).name}")
    except Exception as e:  # any failure of the service (HTTP status, DNS, refused connection: the HTTP client
        # differs between huggingface_hub versions) is the same to the user: the upload failed, the export is here
        if isinstance(e, ConfigError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {first[:200]}); the export "
                          f"is in {folder}") from e
    return str(getattr(info, "commit_url", info))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-ft export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adapter", help="PEFT adapter directory from a Lightning checkpoint")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tokenizer", default=None, help="tokenizer to save alongside (default: the base's)")
    a.add_argument("--base", default=None, help="where to load the base from (default: the path the checkpoint "
                   "records; the weights must be the same)")
    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain HF model")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--base", default=None, help="base model (default: the one the adapter was trained on)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--attn-implementation", default="auto",
                   choices=["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"])
    for p in (a, m):
        p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (never an input)")
        p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                       help="upload the written directory to this hub model repository (needs network and a token)")
        p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    g = sub.add_parser("gguf", help="convert a merged model or an adapter to GGUF with llama.cpp's converter")
    g.add_argument("--src", required=True, help="a merged model directory (export merge) or an adapter directory")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--llama_cpp", default=None, help="llama.cpp checkout holding convert_hf_to_gguf.py and "
                   "convert_lora_to_gguf.py (default: $LLAMA_CPP_DIR, else the scripts on PATH)")
    g.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    g.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "gguf":
        from lit_ft.cli.gguf import to_gguf

        print(to_gguf(args.src, args.out, args.llama_cpp, args.outtype, args.overwrite))
        return
    if args.push_to_hub is not None:
        check_hub_target(args.push_to_hub)  # before a possibly long export
    if args.command == "adapter":
        print(adapter_from_checkpoint(args.ckpt, args.out, args.tokenizer, args.base, args.overwrite))
    else:
        print(merge(args.adapter, args.out, args.base, args.dtype, args.attn_implementation, args.overwrite))
    if args.push_to_hub is not None:
        print(push_to_hub(args.out, args.push_to_hub, args.private))


if __name__ == "__main__":
    main()
