import math

import pytest
import torch
import transformers
import torch.nn.functional as F
from torch.testing import assert_close

from losses import (
    ga_loss,
    graddiff_loss,
    make_control_vector,
    npo_loss,
    npo_retain_loss,
    retain_weighted,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_nll,
    simnpo_loss,
    token_mean_ce,
)

IGN = -100


def _batch(seed=0, B=2, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGN  # prompt tokens
    labels[1, :3] = IGN
    labels[1, -1] = IGN  # right padding
    return logits, labels


# ---------------------------------------------------------------- NLL / CE


def test_sequence_nll_hand_value():
    # One sequence, V=2; logits[t] predicts labels[t+1].
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGN, 1, 0]])
    nll, n = sequence_nll(logits, labels)
    # t=0 -> label 1 under uniform: log 2;  t=1 -> label 0 under [2, 0]: log(1 + e^-2)
    assert_close(nll, torch.tensor([math.log(2) + math.log1p(math.exp(-2))]))
    assert n.tolist() == [2]


def test_sequence_nll_matches_loop():
    logits, labels = _batch()
    nll, n = sequence_nll(logits, labels)
    logp = logits.log_softmax(-1)
    for i in range(labels.shape[0]):
        ref = -sum(logp[i, t, labels[i, t + 1]] for t in range(labels.shape[1] - 1) if labels[i, t + 1] != IGN)
        assert_close(nll[i], ref)
        assert n[i] == (labels[i, 1:] != IGN).sum()


def test_sequence_nll_sums_equal_token_mean_times_count():
    logits, labels = _batch(1)
    nll, n = sequence_nll(logits, labels)
    assert_close(nll.sum(), token_mean_ce(logits, labels) * n.sum())


def test_ignored_positions_get_zero_gradient():
    logits, labels = _batch(2)
    logits.requires_grad_(True)
    token_mean_ce(logits, labels).backward()
    # logits[:, t] is used only if labels[:, t+1] is a target; the last position never is.
    used = torch.zeros(labels.shape, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != IGN
    assert torch.all(logits.grad[~used] == 0)
    assert torch.all(logits.grad[used].abs().sum(-1) > 0)


def test_all_masked_batch_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = token_mean_ce(logits, torch.full((1, 3), IGN))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_token_mean_ce_equals_hf_llama_loss():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[:, :4] = IGN
    labels[2, -2:] = IGN
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert_close(token_mean_ce(out.logits, labels), out.loss)


# ---------------------------------------------------------------- GA / GradDiff / retain


def test_ga_and_graddiff_hand_values():
    f, r = torch.tensor(2.0), torch.tensor(0.5)
    assert ga_loss(f).item() == -2.0
    assert graddiff_loss(f, r).item() == -1.5
    assert_close(graddiff_loss(f, r, gamma=0.5, alpha=3.0), torch.tensor(-1.0 + 1.5))


def test_retain_weighted():
    assert_close(retain_weighted(torch.tensor(1.0), torch.tensor(2.0), lam=0.5), torch.tensor(2.0))
    assert retain_weighted(torch.tensor(1.0), torch.tensor(2.0), lam=0.0).item() == 1.0


# ---------------------------------------------------------------- NPO


@pytest.mark.parametrize("beta", [0.1, 0.9, 2.0])
def test_npo_at_reference_is_two_over_beta_log2(beta):
    seq = torch.tensor([3.0, 10.0, 0.5])
    expected = torch.tensor(2 / beta * math.log(2))
    assert_close(npo_loss(seq, seq.clone(), beta), expected)
    ce = torch.tensor(1.7)
    assert_close(npo_loss(ce, ce.clone(), beta, normalization="batch_mean_ce"), expected)


def test_npo_hand_value():
    beta = 0.5
    policy, ref = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 3.0])
    # log-ratios 2 and -2: -(2/b) * mean(log sig(1), log sig(-1))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(2 / beta) * 0.5 * (math.log(sig(1.0)) + math.log(sig(-1.0)))
    assert_close(npo_loss(policy, ref, beta), torch.tensor(expected))


@pytest.mark.parametrize("norm,shape", [("sequence_sum", (4,)), ("batch_mean_ce", ())])
def test_npo_gradient_pushes_policy_nll_up_and_ref_is_detached(norm, shape):
    policy = torch.full(shape, 2.0, requires_grad=True)
    ref = torch.full(shape, 2.5, requires_grad=True)
    npo_loss(policy, ref, beta=0.9, normalization=norm).backward()
    assert torch.all(policy.grad < 0)  # descent increases the forget NLL
    assert ref.grad is None


def test_npo_retain_hand_value_and_direction():
    # The official retain term: alpha * (2/b) * log sig(b * (CE_r - CE_r,ref)), here alpha = 1.
    beta, sig = 0.9, (lambda x: 1 / (1 + math.exp(-x)))  # noqa: E731
    policy = torch.tensor(2.0, requires_grad=True)
    ref = torch.tensor(1.5)
    loss = npo_retain_loss(policy, ref, beta)
    assert_close(loss, torch.tensor((2 / beta) * math.log(sig(beta * 0.5))))
    loss.backward()
    assert policy.grad > 0  # descent lowers the retain CE
    same = torch.tensor(1.0)
    assert_close(npo_retain_loss(same, same.clone(), beta), torch.tensor(-(2 / beta) * math.log(2)))


def test_npo_rejects_mixed_up_normalisation():
    with pytest.raises(ValueError, match="sequence_sum"):
        npo_loss(torch.tensor(1.0), torch.tensor(1.0), 0.9)  # scalars under the default
    with pytest.raises(ValueError, match="batch_mean_ce"):
        npo_loss(torch.ones(3), torch.ones(3), 0.9, normalization="batch_mean_ce")
    with pytest.raises(ValueError, match="unknown NPO normalization"):
        npo_loss(torch.ones(3), torch.ones(3), 0.9, normalization="token_mean")


# ---------------------------------------------------------------- SimNPO


def test_simnpo_hand_value():
    beta, delta = 2.0, 0.5
    nll, n = torch.tensor([6.0, 2.0]), torch.tensor([3, 4])
    # per-token 2.0 and 0.5 -> beta*(x - delta) = 3.0 and 0.0
    expected = -(2 / beta) * 0.5 * (F.logsigmoid(torch.tensor(3.0)) + F.logsigmoid(torch.tensor(0.0)))
    assert_close(simnpo_loss(nll, n, beta, delta), expected)
    # delta = 0 at zero NLL: (2/beta) log 2, like NPO at the reference
    assert_close(simnpo_loss(torch.zeros(2), n, beta), torch.tensor(2 / beta * math.log(2)))


def test_simnpo_gradient_pushes_nll_up():
    nll = torch.tensor([1.0, 4.0], requires_grad=True)
    simnpo_loss(nll, torch.tensor([2, 5]), beta=1.0, delta=0.2).backward()
    assert torch.all(nll.grad < 0)


def test_simnpo_empty_response_does_not_divide_by_zero():
    assert torch.isfinite(simnpo_loss(torch.tensor([0.0]), torch.tensor([0]), beta=1.0))


# ---------------------------------------------------------------- RMU


def test_rmu_forget_hand_value_masked_and_all():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [1, 3, 2]
    control = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0]])
    # squared errors: (0, 4), (4, 16), (64, 81); masked mean over 4 elements = 24/4
    assert_close(rmu_forget_loss(hidden, control, mask), torch.tensor(6.0))
    assert_close(rmu_forget_loss(hidden, control, mask, reduction="all"), torch.tensor(169.0 / 6))
    assert_close(rmu_forget_loss(hidden, control), torch.tensor(169.0 / 6))  # mask=None: every position
    # "all" is exactly the official F.mse_loss convention
    assert_close(rmu_forget_loss(hidden, control, reduction="all"), F.mse_loss(hidden, control.expand_as(hidden)))


def test_rmu_retain_hand_value_and_ref_detached():
    hidden = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]], requires_grad=True)
    ref = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    loss = rmu_retain_loss(hidden, ref, torch.tensor([[1, 0]]))
    assert_close(loss, torch.tensor(0.5))  # (1 + 0) / 2 dims
    loss.backward()
    assert ref.grad is None


@pytest.mark.parametrize("which", ["forget", "retain"])
def test_rmu_masked_positions_get_exactly_zero_gradient(which):
    hidden = torch.randn(2, 4, 3)
    hidden[1, 3] = float("nan")  # garbage in a padded slot must not leak
    hidden.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])
    if which == "forget":
        loss = rmu_forget_loss(hidden, make_control_vector(3, 10.0, seed=0), mask)
    else:
        loss = rmu_retain_loss(hidden, torch.randn(2, 4, 3), mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(hidden.grad[mask == 0] == 0)
    assert torch.all(hidden.grad[mask == 1].abs().sum(-1) > 0)


def test_rmu_rejects_bad_mask_and_reduction():
    with pytest.raises(ValueError, match="mask"):
        rmu_forget_loss(torch.zeros(1, 3, 2), torch.zeros(2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown RMU reduction"):
        rmu_forget_loss(torch.zeros(1, 3, 2), torch.zeros(2), reduction="sum")


def test_control_vector_deterministic_unit_direction_norm_coeff():
    state = torch.get_rng_state()
    a, b = make_control_vector(64, 6.5, seed=3), make_control_vector(64, 6.5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # own generator, global RNG untouched
    assert torch.equal(a, b)
    assert not torch.equal(a, make_control_vector(64, 6.5, seed=4))
    assert_close(a.norm(), torch.tensor(6.5))
    assert torch.all(a >= 0)  # u ~ U[0, 1)^d
    assert make_control_vector(8, 1.0, seed=0, dtype=torch.bfloat16).dtype == torch.bfloat16
