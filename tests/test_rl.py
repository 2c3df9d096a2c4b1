"""lit_ft.losses against plain Python loops, hand-derived numbers and Monte Carlo on known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.losses import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    first_true_index,
    gae,
    kl_controller,
    kl_estimate,
    last_true_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    ratio_guard,
    response_mask_after_eos,
)


def _prefix_mask(lengths, T):
    return torch.tensor([[1 if t < n else 0 for t in range(T)] for n in lengths], dtype=torch.bool)


def test_masked_stats_match_python():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    vals = [1.0, 2.0, 3.0, 4.0]
    mean = sum(vals) / 4
    var_b = sum((v - mean) ** 2 for v in vals) / 4
    assert float(masked_sum(x, mask)) == 10.0
    assert float(masked_mean(x, mask)) == mean
    assert math.isclose(float(masked_var(x, mask, unbiased=False)), var_b, rel_tol=1e-6)
    assert math.isclose(float(masked_var(x, mask)), var_b * 4 / 3, rel_tol=1e-6)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.5]))
    torch.testing.assert_close(masked_sum(x, mask.float(), dim=0), torch.tensor([4.0, 2.0, 4.0]))
    # Float and bool masks agree; an empty mask gives 0, not NaN.
    assert float(masked_mean(x, mask.float())) == mean
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    std = math.sqrt(sum((v - 2.5) ** 2 for v in [1, 2, 3, 4]) / 3 + 1e-8)
    w = masked_whiten(x, mask)
    expected = torch.tensor([[(1 - 2.5) / std, (2 - 2.5) / std, 0.0], [(3 - 2.5) / std, 0.0, (4 - 2.5) / std]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_kl_estimators_exact_values_and_signs():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    k3 = kl_estimate(lp, ref, "k3")
    expected = [(math.exp(r - p) - 1) - (r - p) for p, r in zip(lp[0].tolist(), ref[0].tolist())]
    torch.testing.assert_close(k3, torch.tensor([expected]))
    assert torch.all(k3 >= 0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    assert torch.all(kl_estimate(a, b, "k3") >= 0)
    for est in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(a, a, est) == 0)
    with pytest.raises(ValueError):
        kl_estimate(a, b, "k4")


def test_kl_estimators_are_unbiased_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    for est in ("k1", "k3"):
        assert math.isclose(float(kl_estimate(logp, logq, est).mean()), true_kl, rel_tol=0.03)


def test_index_helpers_and_response_mask():
    m = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert first_true_index(m).tolist() == [1, 4, 0]
    assert last_true_index(m).tolist() == [2, -1, 3]
    eos, pad = 2, 0
    tokens = torch.tensor(
        [
            [5, 6, 2, 0, 0],  # EOS then pads
            [5, 2, 7, 2, 0],  # two EOS: cut after the first
            [5, 6, 7, 8, 9],  # truncated: keep all
            [2, 0, 0, 0, 0],  # immediate EOS
            [5, 6, 0, 0, 0],  # no EOS, a sampled pad (pad != eos): the response ends before it
            [5, 0, 7, 2, 0],  # a sampled pad mid-response: it ends there, no hole in the mask
            [0, 5, 6, 2, 0],  # a response that starts with a pad: that one token, not an empty response
        ]
    )
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0],
                [1, 0, 0, 0, 0]]
    assert response_mask_after_eos(tokens, eos, pad).int().tolist() == expected
    # pad == eos (SmolLM2): the first pad is the EOS and is kept.
    tokens = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]])
    assert response_mask_after_eos(tokens, 2, 2).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_compute_rewards_places_score_on_last_token():
    scores = torch.tensor([1.0, -2.0])
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.2, -0.8, -1.0], [-1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards, kl = compute_rewards(scores, lp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.2, -0.2, 0.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.02, 0.02, 1.0], [-0.05, -2.0, 0.0]]))
    _, kl3 = compute_rewards(scores, lp, ref, mask.float(), kl_coef=0.1, estimator="k3")
    assert torch.all(kl3 >= 0) and kl3[1, 2] == 0
    with pytest.raises(ValueError, match=r"\[1\]"):
        compute_rewards(scores, lp, ref, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)


def _gae_loop(values, rewards, lengths, gamma, lam):
    """Reference: for each row, standard GAE over its first `n` tokens, terminal value 0, zeros after."""
    B, T = len(values), len(values[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            a = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma * lam)^(k - t) * delta_k
                v_next = values[b][k + 1] if k + 1 < n else 0.0
                delta = rewards[b][k] + gamma * v_next - values[b][k]
                a += (gamma * lam) ** (k - t) * delta
            adv[b][t] = a
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 9
    lengths = [9, 1, 4, 6, 0]
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage after the mask must be ignored
    mask = _prefix_mask(lengths, T)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    ref = torch.tensor(_gae_loop(values.tolist(), rewards.tolist(), lengths, gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, adv + values)
    assert torch.all(adv[~mask] == 0)


def test_gae_hand_numbers():
    # One row, two tokens: V = (1, 2), r = (0, 3), gamma = 0.5, lam = 0.5.
    # delta_1 = 3 + 0 - 2 = 1; delta_0 = 0 + 0.5 * 2 - 1 = 0; A_1 = 1; A_0 = 0 + 0.25 * 1 = 0.25.
    adv, ret = gae(torch.tensor([[1.0, 2.0, 7.0]]), torch.tensor([[0.0, 3.0, 5.0]]), torch.tensor([[1, 1, 0]]), 0.5, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.25, 3.0, 7.0]]))


def test_ppo_policy_loss_hand_numbers():
    # Token 0: ratio e^0.5 ~ 1.6487 > 1.2 with A = 1: max(-1.6487, -1.2) = -1.2 (clipped term larger).
    # Token 1: ratio e^-0.1 ~ 0.9048 inside [0.8, 1.2], A = -2: both terms 1.8097 (not counted as clipped).
    # Token 2: masked out (huge ratio must not leak into any statistic).
    lp = torch.tensor([[0.5, -0.1, 5.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_policy_loss(lp, old, adv, mask, cliprange=0.2)
    r0, r1 = math.exp(0.5), math.exp(-0.1)
    assert math.isclose(float(loss), (-1.2 + 2 * r1) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["clipfrac"]), 0.5)
    assert math.isclose(float(stats["approxkl"]), 0.5 * (0.25 + 0.01) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["ratio_mean"]), (r0 + r1) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["ratio_max"]), r0, rel_tol=1e-6)
    # Gradient flows only through the unclipped token: d/dlp1 of (-A * e^lp1) / 2 = 2 * r1 / 2.
    lp = lp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(lp, old, adv, mask, cliprange=0.2)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, r1, 0.0]]))
    assert all(not v.requires_grad for v in stats.values())


def test_ppo_value_loss_hand_numbers():
    # Token 0: v = 2, old = 0, R = 3, c = 0.5: clipped v = 0.5; (2-3)^2 = 1 < (0.5-3)^2 = 6.25 -> 6.25, clipped.
    # Token 1: v = 1, old = 0.9, R = 0: inside the clip range -> 1.
    # Token 2: masked.
    v = torch.tensor([[2.0, 1.0, 100.0]])
    old = torch.tensor([[0.0, 0.9, 0.0]])
    ret = torch.tensor([[3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = ppo_value_loss(v, old, ret, mask, cliprange_value=0.5)
    assert math.isclose(float(loss), 0.5 * (6.25 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["vf_clipfrac"]), 0.5)


def test_ratio_guard_both_sides():
    mask = torch.tensor([[1, 1, 0]])
    old = torch.zeros(1, 3)
    lp = torch.tensor([[math.log(2.0), math.log(4.0), 50.0]])  # masked mean ratio 3
    assert ratio_guard(lp, old, mask, threshold=2.9) is True
    assert ratio_guard(lp, old, mask, threshold=3.1) is False


def test_fixed_kl_controller():
    c = kl_controller(False, 0.05, 6.0, 10000)
    assert isinstance(c, FixedKLController) and c.value == 0.05
    c.update(100.0, 512)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_kl_controller_hand_numbers():
    c = kl_controller(True, 0.1, target=6.0, horizon=1000)
    assert isinstance(c, AdaptiveKLController)
    c.update(6.6, n_steps=100)  # error 0.1: 0.1 * (1 + 0.1 * 0.1) = 0.101
    assert math.isclose(c.value, 0.101)
    c.update(torch.tensor(60.0), n_steps=100)  # error 9 clipped to 0.2: * 1.02
    assert math.isclose(c.value, 0.101 * 1.02)
    c.update(0.0, n_steps=500)  # error -1 clipped to -0.2: * 0.9
    assert math.isclose(c.value, 0.101 * 1.02 * 0.9)
    c.update(6.0, n_steps=500)  # on target: unchanged
    assert math.isclose(c.value, 0.101 * 1.02 * 0.9)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(c.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (c.value, 6.0, 1000.0)
    with pytest.raises(ValueError):
        kl_controller(True, 0.1, target=None, horizon=1000)


def test_negative_mean_kl_is_flagged():
    from lit_ft.losses import kl_looks_wrong

    assert kl_looks_wrong(-0.5)
    assert not kl_looks_wrong(-0.05)  # sampling noise around a near-zero KL
    assert not kl_looks_wrong(torch.tensor(2.0))


# -- critic-free estimators and losses (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO) -------------------------------

from lit_ft.losses import aggregate_loss, clipped_policy_loss, group_advantages, overlong_penalty, zero_std_groups  # noqa: E402

# Two prompts, k = 4: one answered right once in four, one always right (a group of equal rewards).
SCORES = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])


def test_group_advantages_match_hand_derived_numbers():
    # group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal -> 0 everywhere.
    zeros = [0.0] * 4
    expected = {
        "grpo": [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001] + zeros,
        "dr_grpo": [0.75, -0.25, -0.25, -0.25] + zeros,
        "rloo": [1.0 - 0.0, 0.0 - 1 / 3, 0.0 - 1 / 3, 0.0 - 1 / 3] + zeros,  # r_i - mean of the other three
    }
    for name, want in expected.items():
        torch.testing.assert_close(group_advantages(SCORES, 4, name), torch.tensor(want), rtol=0, atol=1e-6)
    # REINFORCE++: the whole batch: mean 5/8, unbiased var (5 * 0.375^2 + 3 * 0.625^2) / 7 = 1.875 / 7.
    std = math.sqrt(1.875 / 7)
    want = [(r - 0.625) / (std + 1e-8) for r in SCORES.tolist()]
    torch.testing.assert_close(group_advantages(SCORES, 4, "reinforce_pp"), torch.tensor(want), rtol=0, atol=1e-6)
    # given global moments (every rank's batch), they replace the local ones
    got = group_advantages(SCORES, 4, "reinforce_pp", (torch.tensor(0.5), torch.tensor(2.0)))
    torch.testing.assert_close(got, (SCORES - 0.5) / (2.0 + 1e-8))


def test_group_advantages_of_single_samples_and_bad_shapes():
    one = torch.tensor([0.3, 0.9])
    for name in ("grpo", "dr_grpo"):  # a group of one has no baseline beside it: no signal
        assert group_advantages(one, 1, name).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        group_advantages(one, 1, "rloo")
    assert group_advantages(torch.tensor([0.7]), 1, "reinforce_pp").tolist() == [0.0]
    with pytest.raises(ValueError, match="do not split into groups of k=3"):
        group_advantages(SCORES, 3, "grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(SCORES, 4, "ppo")


def test_zero_std_groups():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert zero_std_groups(scores, 2).tolist() == [False, True, True, True]
    assert zero_std_groups(scores, 4).tolist() == [False, False]


def test_aggregations_with_early_eos():
    losses = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # row 0 ended at its second token: 30 and 40 carry nothing
    assert float(aggregate_loss(losses, mask, "token_mean")) == pytest.approx(29 / 6)
    assert float(aggregate_loss(losses, mask, "sequence_mean")) == pytest.approx((1.5 + 6.5) / 2)
    assert float(aggregate_loss(losses, mask, "constant", max_len=4)) == pytest.approx(29 / 8)
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(losses, mask, "constant")


def _grad(logprob, old, adv, low, high):
    lp = torch.tensor([[logprob]], requires_grad=True)
    loss, stats = clipped_policy_loss(lp, torch.tensor([[old]]), torch.tensor([adv]), torch.ones(1, 1), low, high)
    loss.backward()
    return float(loss.detach()), float(lp.grad), stats


def test_clip_higher_is_asymmetric():
    r = math.log(1.25)  # ratio 1.25 after earlier updates
    # A > 0: symmetric 0.2 clips at 1.2 (no gradient); clip-higher 0.28 lets the token rise further (gradient -A*ratio).
    loss, grad, stats = _grad(r, 0.0, 1.0, 0.2, 0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and float(stats["clip_ratio/high_mean"]) == 1.0
    loss, grad, stats = _grad(r, 0.0, 1.0, 0.2, 0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and float(stats["clip_ratio/high_mean"]) == 0
    # A < 0 at ratio 0.75: the low side clips at 0.8 either way (loss 0.8 A-weighted, no gradient).
    loss, grad, stats = _grad(math.log(0.75), 0.0, -1.0, 0.2, 0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert float(stats["clip_ratio/low_mean"]) == 1.0 and float(stats["clip_ratio/region_mean"]) == 1.0
    # A < 0 at ratio 1.25: not clipped (the pessimistic max keeps the unclipped term).
    loss, grad, _ = _grad(r, 0.0, -1.0, 0.2, 0.28)
    assert loss == pytest.approx(1.25) and grad == pytest.approx(1.25)


def test_kl_term_is_k3_times_beta():
    lp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.9]]))
    mask = torch.tensor([[1, 0]])  # the second token is after EOS: no loss, no KL
    k3 = (0.25 / 0.5 - 1) - math.log(0.25 / 0.5)
    loss, stats = clipped_policy_loss(lp, lp.detach(), torch.tensor([0.0]), mask, 0.2, 0.28, ref_logprobs=ref,
                                      beta=0.1)
    assert float(loss) == pytest.approx(0.1 * k3) and float(stats["kl"]) == pytest.approx(k3)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5
    assert lp.grad[0].tolist() == pytest.approx([0.1 * 0.5, 0.0])


def test_gspo_weights_every_token_by_its_sequences_length_normalised_ratio():
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t(logp - old)); loss per token max(-A s_i, -A clip(s_i)), so the
    gradient of token t of row i is -A_i s_i / |y_i| summed over the row's tokens' loss terms (unclipped rows)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, 0.0]])
    lp = (old + torch.tensor([[0.1, -0.05, 0.2], [0.02, 0.04, 0.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = clipped_policy_loss(lp, old, adv, mask, 0.2, 0.28, "sequence_mean", level="sequence")
    s = [math.exp((0.1 - 0.05 + 0.2) / 3), math.exp((0.02 + 0.04) / 2)]  # both inside [0.8, 1.28]
    assert float(loss) == pytest.approx((-1.0 * s[0] + 1.0 * s[1]) / 2, rel=1e-6)
    loss.backward()
    expected = [[-s[0] / 3 / 2] * 3, [s[1] / 2 / 2, s[1] / 2 / 2, 0.0]]
    assert lp.grad.tolist()[0] == pytest.approx(expected[0], rel=1e-5)
    assert lp.grad.tolist()[1] == pytest.approx(expected[1], rel=1e-5)
    # one sequence ratio past the upper clip with A > 0: the whole response stops, not one token
    far = (old + torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])).requires_grad_(True)
    loss, stats = clipped_policy_loss(far, old, adv, mask, 0.2, 0.28, "token_mean", level="sequence")
    loss.backward()
    assert far.grad[0].abs().sum() == 0 and float(stats["clip_ratio/high_mean"]) == pytest.approx(3 / 5)


def test_cispo_is_reinforce_weighted_by_the_clipped_detached_ratio():
    """CISPO (MiniMax-M1 2025): d loss / d logp_t = -min(r_t, max) * A / N for every token, clipped or not."""
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[2.0, 1.0, 9.0]])).requires_grad_(True)  # ratios 2, 1, 9
    loss, stats = clipped_policy_loss(lp, old, torch.tensor([0.5]), torch.ones(1, 3), 0.2, 0.28, "token_mean",
                                      policy_loss="cispo", cispo_ratio_max=5.0)
    weights = [2.0, 1.0, 5.0]
    assert float(loss) == pytest.approx(-sum(w * 0.5 * math.log(r) for w, r in zip(weights, [2, 1, 9])) / 3)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-w * 0.5 / 3 for w in weights])  # the clipped token too
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="expected clip or cispo"):
        clipped_policy_loss(lp, old, torch.tensor([0.5]), torch.ones(1, 3), 0.2, 0.28, policy_loss="nope")


def test_overlong_penalty():
    got = overlong_penalty(torch.tensor([3, 6, 8, 10]), max_len=10, buffer=4, factor=0.5)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer=5)


# ---------------------------------------------------------------------------------------------- rollout correction

from lit_ft.losses import rollout_correction, rollout_mismatch  # noqa: E402

# Token weights w = exp(train - sampler): 1, 3, 0.5 on row 0 (its 4th token is after EOS, whatever it holds), 4, 1.5
# on row 1. With cap 2: tis gives 1, 2, 0.5 | 2, 1.5; mis gives 1, 0, 0.5 | 0, 1.5.
SAMPLER = torch.tensor([[-1.0, -2.0, -0.3, float("-inf")], [-0.7, -1.1, 0.0, 0.0]])
TRAIN = SAMPLER.nan_to_num(neginf=0.0) + torch.log(torch.tensor([[1.0, 3.0, 0.5, 7.0], [4.0, 1.5, 1.0, 1.0]]))
CORRECTION_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("mode, weights", [("tis", [[1.0, 2.0, 0.5, 0.0], [2.0, 1.5, 0.0, 0.0]]),
                                           ("mis", [[1.0, 0.0, 0.5, 0.0], [0.0, 1.5, 0.0, 0.0]])])
def test_rollout_correction_weights_by_hand(mode, weights):
    w = rollout_correction(TRAIN, SAMPLER, CORRECTION_MASK, mode, cap=2.0)
    torch.testing.assert_close(w, torch.tensor(weights), rtol=1e-6, atol=0)
    assert not w.requires_grad
    assert rollout_correction(TRAIN, SAMPLER, CORRECTION_MASK, "none", cap=2.0) is None
    stats = rollout_mismatch(SAMPLER, TRAIN, CORRECTION_MASK, mode, cap=2.0)
    d = [[0.0, -math.log(3), -math.log(0.5)], [-math.log(4), -math.log(1.5)]]  # sampler - train, masked tokens
    assert float(stats["logprob_diff_mean"]) == pytest.approx(sum(abs(x) for r in d for x in r) / 5, rel=1e-6)
    assert float(stats["logprob_diff_max"]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(stats["kl_sampler_train"]) == pytest.approx((sum(d[0]) + sum(d[1])) / 2, rel=1e-6)
    assert float(stats["correction_weight_mean"]) == pytest.approx(sum(map(sum, weights)) / 5, rel=1e-6)
    assert float(stats["correction_masked_frac"]) == pytest.approx(2 / 5)  # w = 3 and w = 4 exceed the cap
    assert set(rollout_mismatch(SAMPLER, TRAIN, CORRECTION_MASK)) == {"logprob_diff_mean", "logprob_diff_max",
                                                                      "kl_sampler_train"}
    with pytest.raises(ValueError, match="unknown rollout correction 'is'"):
        rollout_correction(TRAIN, SAMPLER, CORRECTION_MASK, "is", cap=2.0)


@pytest.mark.parametrize("mode, weights", [("tis", [1.0, 2.0, 0.5]), ("mis", [1.0, 0.0, 0.5])])
def test_rollout_correction_weighs_the_policy_terms_not_the_kl(mode, weights):
    """Through both policy losses at ratio 1 (old = current): GRPO's token mean is -A * sum(w) / 3 and its
    gradient -A * w_t / 3; the k3 KL term (beta 0.1) is added unweighted. PPO's masked token mean alike with a
    per-token advantage; its ratio stats are not weighted."""
    lp = TRAIN[:1].clone().requires_grad_(True)
    mask = CORRECTION_MASK[:1]
    w = rollout_correction(TRAIN[:1], SAMPLER[:1], mask, mode, cap=2.0)
    ref = lp.detach() - 0.5  # k3 = (e^-0.5 - 1) + 0.5 on every token
    k3 = math.exp(-0.5) - 1 + 0.5
    loss, _ = clipped_policy_loss(lp, lp.detach(), torch.tensor([2.0]), mask, 0.2, 0.28, "token_mean",
                                  ref_logprobs=ref, beta=0.1, token_weights=w)
    assert loss.item() == pytest.approx(-2.0 * sum(weights) / 3 + 0.1 * k3, rel=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - e^-0.5
    want = [-2.0 * x / 3 + 0.1 * (1 - math.exp(-0.5)) / 3 for x in weights] + [0.0]
    assert lp.grad[0].tolist() == pytest.approx(want, rel=1e-5)
    plain, _ = clipped_policy_loss(lp, lp.detach(), torch.tensor([2.0]), mask, 0.2, 0.28, "token_mean")
    assert plain.item() == pytest.approx(-2.0, rel=1e-6)  # no weights: w = 1 everywhere
    lp.grad = None
    adv = torch.tensor([[1.0, -1.0, 3.0, 9.0]])
    pg, stats = ppo_policy_loss(lp, lp.detach(), adv, mask, 0.2, token_weights=w)
    assert pg.item() == pytest.approx(-(1.0 * weights[0] - 1.0 * weights[1] + 3.0 * weights[2]) / 3, rel=1e-6)
    pg.backward()
    assert lp.grad[0].tolist() == pytest.approx([-a * x / 3 for a, x in zip([1.0, -1.0, 3.0], weights)] + [0.0])
    assert float(stats["ratio_mean"]) == pytest.approx(1.0) and float(stats["clipfrac"]) == 0.0
