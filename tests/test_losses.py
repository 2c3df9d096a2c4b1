"""lit_ft.losses against independent references: full-logits F.cross_entropy, log_softmax+gather, hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_ft.losses import (
    LogitTransform,
    bradley_terry_loss,
    causal_lm_loss,
    entropy_from_logits,
    selective_log_softmax,
)

B, T, H, V = 3, 7, 8, 11


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[1, -2:] = -100  # masked padding
    labels[2, 4] = -100  # a hole
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    """The naive computation: full [B, T, V] logits, shift, F.cross_entropy(sum)."""
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 4096])
def test_causal_lm_loss_matches_full_cross_entropy_and_grads(chunk_size):
    hidden, weight, labels = _inputs()
    loss, n = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref, ref_n = _reference(h2, w2, labels)
    rh, rw = torch.autograd.grad(ref, (h2, w2))

    assert n.dtype == torch.long and n.dim() == 0 and int(n) == ref_n == 13
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)
    # The last position predicts nothing, so it gets no gradient.
    assert gh[:, -1].abs().sum() == 0


def test_causal_lm_loss_shift_is_hand_checkable():
    # One sequence, H = V = 2, identity head: logits equal the hidden states.
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])  # position 0 predicts token 1 from logits (0, 0): loss log 2
    loss, n = causal_lm_loss(hidden, torch.eye(2), labels)
    assert int(n) == 1 and math.isclose(float(loss), math.log(2), rel_tol=1e-6)


def test_causal_lm_loss_custom_ignore_index_and_no_grad():
    hidden, weight, labels = _inputs(seed=1)
    labels = labels.masked_fill(labels == -100, 0).masked_fill(labels == 3, -1)
    with torch.no_grad():
        loss, n = causal_lm_loss(hidden, weight, labels, ignore_index=-1, chunk_size=3)
        ref = F.cross_entropy((hidden @ weight.t())[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-1, reduction="sum")
    torch.testing.assert_close(loss, ref)
    assert int(n) == int((labels[:, 1:] != -1).sum())


def test_causal_lm_loss_all_masked_is_connected_zero():
    hidden, weight, _ = _inputs(dtype=torch.bfloat16)
    labels = torch.full((B, T), -100)
    loss, n = causal_lm_loss(hidden, weight, labels)
    assert int(n) == 0 and loss.dtype == torch.float32 and float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph
    assert hidden.grad is not None and torch.all(hidden.grad == 0)
    assert weight.grad is not None and torch.all(weight.grad == 0)


def test_causal_lm_loss_bf16_returns_fp32_close_to_fp32_reference():
    hidden, weight, labels = _inputs(dtype=torch.float32)
    loss, _ = causal_lm_loss(hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16(), labels, chunk_size=4)
    ref, _ = _reference(hidden.detach(), weight.detach(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=0.2)


def test_causal_lm_loss_never_saves_full_logits_for_backward():
    """What autograd keeps for backward (outside the per-chunk checkpoints) must total far less than [N, V]:
    without recomputation every chunk's logits/log-probs would be kept (about 2 * N * V elements)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 65, 4, generator=g, requires_grad=True)
    weight = torch.randn(500, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 500, (2, 65), generator=g)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = causal_lm_loss(hidden, weight, labels, chunk_size=16)
    assert int(n) == 128
    assert sum(sizes) < int(n) * 500 // 2  # inputs of each chunk (hidden rows, targets, weight) only
    # Sanity check that the hook would catch the naive version.
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _reference(hidden, weight, labels)
    assert max(sizes) >= int(n) * 500
    loss.backward()
    assert hidden.grad is not None


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_selective_log_softmax_matches_gather(chunk_size):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, V, (B, T), generator=g)
    out = selective_log_softmax(logits, index, chunk_size=chunk_size)
    ref = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad((out * w).sum(), logits)
    (g2,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_selective_log_softmax_bf16_is_fp32():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g) * 5
    index = torch.randint(0, V, (B, T), generator=g)
    out = selective_log_softmax(logits.bfloat16(), index, chunk_size=2)
    ref = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_entropy_from_logits_matches_loop():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    out = entropy_from_logits(logits, chunk_size=2)
    for b in range(2):
        for t in range(3):
            z = [math.exp(v) for v in logits[b, t].tolist()]
            p = [v / sum(z) for v in z]
            assert math.isclose(float(out[b, t]), -sum(pi * math.log(pi) for pi in p), rel_tol=1e-12)
    uniform = entropy_from_logits(torch.zeros(1, 1, 8, dtype=torch.bfloat16))
    assert uniform.dtype == torch.float32 and math.isclose(float(uniform), math.log(8), rel_tol=1e-6)


def test_bradley_terry_hand_numbers():
    l = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert math.isclose(float(l), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # Mean over pairs: diffs 1 and -2.
    l = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert math.isclose(float(l), expected, rel_tol=1e-6)
    # Margin 1 turns a diff of 1 into 0: log 2. Tensor and float margins agree.
    l = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert math.isclose(float(l), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)), math.log(2), rel_tol=1e-6)
    # Centering: (1 + 0)^2 = 1 and (3 + 1)^2 = 16, mean 8.5, times 0.1.
    rc, rr = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    base = bradley_terry_loss(rc, rr)
    assert math.isclose(float(bradley_terry_loss(rc, rr, center_coef=0.1)), float(base) + 0.85, rel_tol=1e-6)


def test_bradley_terry_gradient_pushes_rewards_apart():
    rc, rr = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    # d/dr_c of -log sigmoid(r_c - r_r) at 0 is -1/2, averaged over 2 pairs.
    torch.testing.assert_close(rc.grad, torch.full((2,), -0.25))
    torch.testing.assert_close(rr.grad, torch.full((2,), 0.25))


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.125), LogitTransform(softcap=3.0),
                                       LogitTransform(scale=2.0, softcap=5.0)])
def test_causal_lm_loss_with_head_bias_and_transform_matches_hand_formula(transform):
    """bias, then scale, then softcap * tanh(x / softcap), written out on the full logits (Gemma 2's soft-capping)."""
    hidden, weight, labels = _inputs(seed=3)
    bias = torch.randn(V, dtype=torch.float64).requires_grad_()
    logits = (hidden @ weight.t() + bias) * transform.scale
    if transform.softcap:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    loss, n = causal_lm_loss(hidden, weight, labels, chunk_size=4, head_bias=bias, transform=transform)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), ref_grads):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(loss, causal_lm_loss(hidden, weight, labels)[0])  # the transform matters here


def test_logit_transform_temperature_applies_last():
    x = torch.tensor([[10.0, -4.0, 0.5]])
    got = LogitTransform(scale=0.5, softcap=4.0, temperature=0.5).apply(x)
    torch.testing.assert_close(got, 4.0 * torch.tanh(x * 0.5 / 4.0) / 0.5)


# ---------------------------------------------------------------------------------------------- preference losses
# One pair, hand-made: policy log-prob sums chosen -2 (2 tokens), rejected -3 (4 tokens); reference -2.5 and -2.5.
# DPO margin h = (-2 + 2.5) - (-3 + 2.5) = 1.0. With L(z) = log(1 + e^-z) = -log sigmoid(z) and z = beta * h:
# cDPO = (1 - e) L(z) + e L(-z) = L(z) + e z (since L(-z) = L(z) + z); rDPO = ((1 - e) L(z) - e L(-z)) / (1 - 2e)
# = L(z) - e z / (1 - 2e).


def _pair(**kw):
    from lit_ft.losses import preference_loss

    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    args = dict(chosen_logps=t(-2.0), rejected_logps=t(-3.0), ref_chosen_logps=t(-2.5), ref_rejected_logps=t(-2.5),
                chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    args.update(kw)
    losses, rc, rr = preference_loss(**args)
    return float(losses[0]), float(rc[0]), float(rr[0])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("loss_type, kw, expected", [
    ("sigmoid", {}, _softplus(-0.1)),                                     # DPO: L(0.1) = 0.644397
    ("sigmoid", {"label_smoothing": 0.2}, _softplus(-0.1) + 0.2 * 0.1),   # cDPO
    ("robust", {"label_smoothing": 0.2}, _softplus(-0.1) - 0.2 * 0.1 / 0.6),  # rDPO
    ("robust", {"label_smoothing": 0.0}, _softplus(-0.1)),                # rDPO without noise is DPO
    ("hinge", {}, 1 - 0.1 * 1.0),                                         # SLiC: max(0, 1 - beta h)
    ("hinge", {"beta": 2.0}, 0.0),
    # IPO on mean log-probs: h = (-1 + 1.25) - (-0.75 + 0.625) = 0.375; (h - 1 / (2 * 0.1))^2
    ("ipo", {}, (0.375 - 5.0) ** 2),
    # SimPO: beta 2 * (-2/2 - -3/4) - gamma 0.5 = -1.0 -> L(-1) = log(1 + e)
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, _softplus(1.0)),
    ("sigmoid", {"rpo_alpha": 0.5}, _softplus(-0.1) + 0.5 * 2.0 / 2),    # RPO: + alpha * chosen mean NLL (1.0)
])
def test_preference_losses_hand_derived(loss_type, kw, expected):
    loss, _, _ = _pair(loss_type=loss_type, **kw)
    assert loss == pytest.approx(expected, abs=1e-12)


def test_orpo_is_sft_loss_plus_odds_ratio_term():
    def odds(mean_logp):  # p / (1 - p) of the geometric-mean token probability
        p = math.exp(mean_logp)
        return p / (1 - p)

    ratio = math.log(odds(-2.0 / 2) / odds(-3.0 / 4))
    expected = 1.0 + 0.1 * _softplus(-ratio)  # NLL of the chosen (mean over its 2 tokens) + lambda * -log sigmoid
    loss, rc, rr = _pair(loss_type="orpo", ref_chosen_logps=None, ref_rejected_logps=None)
    assert loss == pytest.approx(expected, abs=1e-12)
    assert (rc, rr) == pytest.approx((0.1 * -1.0, 0.1 * -0.75))  # beta x mean log-prob


def test_preference_rewards_are_beta_log_ratios():
    _, rc, rr = _pair(loss_type="sigmoid")
    assert (rc, rr) == pytest.approx((0.1 * 0.5, 0.1 * -0.5), abs=1e-12)
    _, rc, rr = _pair(loss_type="simpo", beta=2.0)
    assert (rc, rr) == pytest.approx((2.0 * -1.0, 2.0 * -0.75), abs=1e-12)


def test_dpo_at_start_is_log2_with_zero_rewards_and_half_beta_gradient():
    from lit_ft.losses import preference_loss

    logps = torch.tensor([-5.0, -1.5, -40.0], dtype=torch.float64)
    chosen, rejected = logps.clone().requires_grad_(), (logps - 3).requires_grad_()
    n = torch.tensor([3, 1, 20])
    for eps in (0.0, 0.3):
        losses, rc, rr = preference_loss(chosen, rejected, logps, logps - 3, n, n, "sigmoid", 0.1, eps)
        torch.testing.assert_close(losses, torch.full((3,), math.log(2), dtype=torch.float64))
        assert rc.abs().max() == 0 and rr.abs().max() == 0
    losses, _, _ = preference_loss(chosen, rejected, logps, logps - 3, n, n, "sigmoid", 0.1)
    losses.mean().backward()
    # d/dlp_w of -log sigmoid(beta h) at h = 0: -beta / 2, over the 3 pairs' mean; +beta / 2 for the rejected.
    torch.testing.assert_close(chosen.grad, torch.full((3,), -0.1 / 2 / 3, dtype=torch.float64))
    torch.testing.assert_close(rejected.grad, torch.full((3,), 0.1 / 2 / 3, dtype=torch.float64))


def test_preference_loss_refuses_bad_settings():
    from lit_ft.losses import log_odds, preference_loss

    z = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        preference_loss(z, z, z, z, z, z, "kto")
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        preference_loss(z, z, None, None, z, z, "sigmoid")
    with pytest.raises(ValueError, match=r"label_smoothing in \[0, 0.5\)"):
        preference_loss(z, z, z, z, z, z, "robust", label_smoothing=0.5)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-9, -50.0]))).all()  # p -> 1 and p -> 0 stay finite


@pytest.mark.parametrize("chunk_size", [1, 4, 4096])
@pytest.mark.parametrize("with_bias_and_transform", [False, True])
def test_frozen_head_loss_computes_the_input_gradient_once_and_equals_the_reference(chunk_size, with_bias_and_transform):
    """A frozen head (the LoRA case) takes the path whose forward computes d loss / d hidden: the loss and the
    hidden-state gradient (scaled by any upstream gradient, here 0.37 as a token-weighted mean would give) equal
    the full-logits reference, and backward runs no matmul over the vocabulary (nothing [n, V] is saved)."""
    hidden, weight, labels = _inputs(seed=3)
    weight = weight.detach()
    bias = torch.randn(V, dtype=torch.float64) if with_bias_and_transform else None
    transform = LogitTransform(scale=0.5, softcap=3.0) if with_bias_and_transform else None
    loss, n = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, head_bias=bias, transform=transform)
    # what backward keeps: the gathered rows' gradient [13, H], never a logits chunk
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(13, H)]
    (gh,) = torch.autograd.grad(loss * 0.37, hidden)

    h2 = hidden.detach().clone().requires_grad_()
    logits = h2 @ weight.t() + (bias if bias is not None else 0)
    if transform is not None:
        logits = torch.tanh(logits * 0.5 / 3.0) * 3.0
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    (rh,) = torch.autograd.grad(ref * 0.37, h2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-10)
    assert int(n) == 13 and gh[:, -1].abs().sum() == 0


def test_frozen_head_loss_backpropagates_into_the_layers_below():
    """The hidden states come from a trainable layer: its weight gradient equals the reference's."""
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(H, H, dtype=torch.float64)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    loss, _ = causal_lm_loss(layer(x), weight, labels, chunk_size=5)
    (got,) = torch.autograd.grad(loss, layer.weight)
    ref, _ = _reference(layer(x), weight, labels)
    (want,) = torch.autograd.grad(ref, layer.weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
