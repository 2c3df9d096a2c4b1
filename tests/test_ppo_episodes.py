"""PPO against an environment (`model.environment`, as GRPO's): GAE over the model's own tokens only, the
environment's turns skipped (checked against a reference recursion over the packed model tokens), and a PPO fit of
multi-turn episodes on the tiny model whose values, advantages and returns are 0 on every environment token."""

from __future__ import annotations

import torch

from lit_ft.losses import gae
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.online.episodes import EpisodeSpec
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.ppo import PPOModule
from lit_ft.stages.ppo_spec import PPOSpec
from lit_ft.train.optim import OptimSpec
from tests.test_episodes import Again, tool_model_dir  # noqa: F401  (a fixture)
from tests.test_ppo import one_thread, prompt_loader, trainer  # noqa: F401


class Twice(Again):
    """`Again` (a user turn between two model turns) with a reward every episode gets: the second turn's length."""

    def step(self, messages):
        out, reward, done = super().step(messages)
        return out, (None if reward is None else len(messages[-1]["content"]) / 10), done


def reference_gae(values: list[float], rewards: list[float], gamma: float, lam: float) -> list[float]:
    """The textbook recursion over one episode's tokens (no mask: every token is the model's)."""
    adv, next_v, next_a = [0.0] * len(values), 0.0, 0.0
    for t in reversed(range(len(values))):
        delta = rewards[t] + gamma * next_v - values[t]
        next_a = delta + gamma * lam * next_a
        adv[t], next_v = next_a, values[t]
    return adv


def test_gae_skips_the_environment_tokens_between_the_model_turns():
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0],    # two turns, an environment turn between
                         [1, 0, 1, 0, 1, 1, 0, 1, 0, 0],    # four turns
                         [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])   # one response (a prefix): the usual recursion
    adv, ret = gae(values, rewards, mask, gamma=0.97, lam=0.9)
    for b in range(3):
        idx = mask[b].nonzero().flatten().tolist()
        want = reference_gae(values[b, idx].tolist(), rewards[b, idx].tolist(), 0.97, 0.9)
        torch.testing.assert_close(adv[b, idx], torch.tensor(want), rtol=1e-6, atol=1e-6)
        assert bool((adv[b][mask[b] == 0] == 0).all())
    torch.testing.assert_close(ret, adv + values)


def test_ppo_fit_with_an_environment_trains_on_the_model_tokens_only(tool_model_dir):  # noqa: F811
    """Episodes of two model turns with a user turn between (`Twice`, its reward the second turn's length): PPO's rollout carries `attend` (both) and `mask` (the model's), and the update sees values,
    advantages and returns of 0 on the environment's tokens, non-zero advantages on both model turns."""
    torch.manual_seed(0)
    module = PPOModule(base=ModelSpec(name_or_path=tool_model_dir, dtype="float32"),
                       lora=LoraSpec(r=8, alpha=16, dropout=0.0), sampling=SamplingSpec(max_new_tokens=8),
                       ppo=PPOSpec(mini_batch_size=4, ppo_epochs=1),
                       optim=OptimSpec(lr=1e-3, scheduler="constant", warmup_ratio=0.0), sample_table_every=0,
                       environment=Twice(), episodes=EpisodeSpec(max_turns=3, max_tokens=200))
    module.configure_model()
    seen = []
    update = module.ppo_update

    def spy(ro):
        seen.append(ro)
        return update(ro)

    module.ppo_update = spy
    trainer(2, limit_val_batches=1).fit(module, train_dataloaders=prompt_loader(module.tokenizer, batch_size=4, n=8),
                                        val_dataloaders=prompt_loader(module.tokenizer, batch_size=4, n=4))
    m = module.trainer.callback_metrics
    for k in ("rollout/env_tokens_mean", "rollout/turns_mean", "objective/environment", "objective/kl",
              "ppo/returns/mean", "val/environment"):
        assert k in m and torch.isfinite(m[k]), k
    assert len(seen) == 2 and float(m["rollout/env_tokens_mean"]) > 0
    for ro in seen:
        env = (ro.attend == 1) & (ro.mask == 0)
        assert bool(env.any()) and bool((ro.mask <= ro.attend).all())
        for x in (ro.values, ro.advantages, ro.returns, ro.old_logprobs, ro.ref_logprobs):
            assert bool((x[ro.mask == 0] == 0).all())
        # an episode's model tokens on both sides of an environment turn get advantages
        row = int(env.any(1).nonzero()[0])
        first_env = int(env[row].nonzero()[0])
        assert bool((ro.advantages[row, :first_env][ro.mask[row, :first_env] == 1] != 0).all())
        assert bool((ro.advantages[row, first_env:][ro.mask[row, first_env:] == 1] != 0).any())


def test_the_plan_of_episodes_holds_max_tokens_decoded_by_generate(tool_model_dir):  # noqa: F811
    """A stage with an environment is planned at `episodes.max_tokens` response tokens (the model's turns and the
    environment's) with transformers' KV cache, freed after the rollout (episodes never use the static engine)."""
    from lit_ft.plan import estimate
    from lit_ft.plan.memory import settings_from

    def make(environment):
        return PPOModule(base=ModelSpec(name_or_path=tool_model_dir, dtype="bfloat16"), lora=LoraSpec(r=8),
                         sampling=SamplingSpec(max_new_tokens=8), ppo=PPOSpec(mini_batch_size=4),
                         reward_fn="tests.test_ppo.uppercase_share", environment=environment,
                         episodes=EpisodeSpec(max_turns=3, max_tokens=300))

    plain, episodic = make(None), make(Twice())
    assert settings_from(episodic).episodes.max_tokens == 300 and settings_from(plain).episodes is None
    rows = {c: (b, how) for c, b, how in estimate(episodic, target="cuda", budget=None, advise=False).rows}
    kv_bytes, kv_how = rows["KV cache (rollout)"]
    assert kv_bytes == 0 and "+ 300) positions" in kv_how and "hf: freed" in kv_how
    plain_rows = {c: (b, how) for c, b, how in estimate(plain, target="cuda", budget=None, advise=False).rows}
    assert "+ 8) positions" in plain_rows["KV cache (rollout)"][1]
    assert estimate(episodic, target="cuda", budget=None).peak > estimate(plain, target="cuda", budget=None).peak
