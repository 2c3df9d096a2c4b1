"""Layer 6, the LightningModules: `SFTModule` (`sft`), `RewardModule` (`reward`), `DPOModule` (`dpo`, with its
precomputed reference table `dpo_ref`), `KTOModule` (`kto`; what it shares with DPO is `offline`), `PPOModule` (`ppo`,
`ppo_spec`) and `GRPOModule` (`grpo`, `grpo_spec`), and the causal-LM stages' `predict_step` (`predict`). A stage
never imports another stage or `lit_ft.data`.

May import: everything below it (`errors`, `validation`, `losses`, `models`, `train`, `online`).
"""
