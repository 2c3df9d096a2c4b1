"""Layer 2, the model: what the user says about it (`spec`), where its weights are and what they are (`identity`,
`default`: the bundled SmolLM2-135M-Instruct), loading and preparing the base (`load`), every per-family decision
read from the loaded model (`families`), LoRA (`lora`), the one builder (`build`), NEFTune (`neftune`), and an
exported adapter directory read and written in one place (`adapters`, with its model card `card`).

May import: `lit_ft.errors`, `lit_ft.validation`, `lit_ft.losses`. Knows nothing of Lightning.
"""

from lit_ft.models.adapters import (  # noqa: F401
    BASE_FILE, RewardExport, check_adapter, check_adapter_base, read_base_identity, read_reward_export,
)
from lit_ft.models.build import build_model, describe, eval_mode, trainable_state_dict  # noqa: F401
from lit_ft.models.default import DEFAULT_MODEL_NAME, default_model_dir  # noqa: F401
from lit_ft.models.identity import local_weights_path, weights_fingerprint  # noqa: F401
from lit_ft.models.load import (  # noqa: F401
    apply_liger_kernel, check_gguf_magic, check_model_files, checkpoint_layer, compile_decoder_layers,
    compile_gradient_passes,
    disable_cpu_4bit_repacking, load_base, load_tokenizer, prepare_for_training, quantization_config, resolve_dtype,
    resolve_name,
)
from lit_ft.models.lora import (  # noqa: F401
    INIT_ATTR, adapt, check_lora, check_start, load_adapter, lora_config, plain_lora, restore_start,
)
from lit_ft.models.spec import ALL_PROJECTIONS, LoraSpec, ModelSpec  # noqa: F401
