"""Layer 3, what a training run needs around the model: checkpoints (`checkpointing`: slim sealed checkpoints,
the resume rule per setting; `integrity`: digests, verified loads; `resume`: the resumable loader, RNG state,
atomic checkpoint IO), run directories and locks (`runs`, `rundirs`), guards against non-finite steps and OOM
(`guards`), optimizers and schedules (`optim`), torchmetrics helpers (`metrics`) and distributed strategies
(`strategies`).

May import: `lit_ft.errors`, `lit_ft.validation`, `lit_ft.losses`, `lit_ft.models`.
"""
