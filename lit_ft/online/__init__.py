"""Layer 5, what the online stages (PPO, GRPO family) share: sampling settings and transformers' generate
(`generation`), the decode engine (`engine`, `engine_ops`: static KV cache, CUDA graphs, merged weights), every
role as an adapter on one base (`roles`), rewards from a scorer or a callable (`scoring`), the rollout batch
(`batch`), the `setup` checks (`checks`), and the steps of a rollout and its update as plain functions the stages bind as methods (`shared`).

May import: everything below it (`errors`, `validation`, `losses`, `models`, `train`, `data`).
"""
