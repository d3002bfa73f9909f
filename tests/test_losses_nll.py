"""Tests for Eq. (1) ``nll`` and Eq. (2) ``sft_loss``."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlmt_edu.losses.nll import nll, sft_loss, token_logp


def random_batch(seed, batch=5, tokens=8, dtype=torch.float64):
    """Seeded log-probabilities in [-3.05, -0.05] and a mask with a prompt, a response and padding per row,
    of a different length in every row."""
    g = torch.Generator().manual_seed(seed)
    logp = -0.05 - 3 * torch.rand(batch, tokens, generator=g, dtype=dtype)
    mask = torch.zeros(batch, tokens)
    for b in range(batch):
        start = b % 3  # prompt length
        length = 1 + (b * 2) % (tokens - start)  # response length
        mask[b, start : start + length] = 1
    assert len(set(mask.sum(1).tolist())) > 1
    return logp, mask


def loop_nll(logp, mask):
    out = []
    for b in range(logp.shape[0]):
        total = 0.0
        for t in range(logp.shape[1]):
            if mask[b, t] == 1:
                total -= float(logp[b, t])
        out.append(total)
    return out


# ---------------------------------------------------------------- nll


def test_nll_hand_value():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    # row 0: -(-2 - 3) = 5 (the first token is prompt); row 1: -(-0.5 - 0.25) = 0.75
    assert torch.allclose(nll(logp, mask), torch.tensor([5.0, 0.75]))


def test_nll_matches_loop():
    logp, mask = random_batch(0)
    expected = torch.tensor(loop_nll(logp, mask), dtype=logp.dtype)
    assert torch.allclose(nll(logp, mask), expected, atol=1e-12)


def test_nll_bool_mask_equals_float_mask():
    logp, mask = random_batch(1)
    assert torch.equal(nll(logp, mask.bool()), nll(logp, mask))


def test_nll_ignores_values_outside_mask():
    logp, mask = random_batch(2)
    scrambled = torch.where(mask == 1, logp, torch.full_like(logp, -1e6))
    assert torch.equal(nll(scrambled, mask), nll(logp, mask))


def test_nll_gradcheck():
    logp, mask = random_batch(3, batch=3, tokens=4)
    assert torch.autograd.gradcheck(lambda x: nll(x, mask), (logp.requires_grad_(),))


def test_nll_paper_numbers_uniform_32000_vocabulary():
    # §2: "log(1/32000) = -10.37" and "(1/32000)^9 = 2.84 x 10^-41"
    vocab = 32000
    logits = torch.zeros(1, 9, vocab, dtype=torch.float64)  # a uniform model
    tokens = torch.arange(9).unsqueeze(0) * 1000
    logp = token_logp(logits, tokens).double()
    assert round(float(logp[0, 0]), 2) == -10.37
    loss = nll(logp, torch.ones(1, 9))
    assert float(loss[0]) == pytest.approx(9 * math.log(32000), rel=1e-6)
    probability = math.exp(-float(loss[0]))
    assert f"{probability:.2e}" == "2.84e-41"


def test_nll_stable_for_extreme_logits():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randint(0, 2, (2, 5, 7), generator=g) * 2 - 1).float().mul(1e4).requires_grad_()
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    loss = nll(token_logp(logits, tokens), torch.ones(2, 5))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert float(loss.detach().max()) > 1e4  # tokens the model rules out cost ~2e4 nats, but finitely many


def _valid_nll():
    return {"logp": torch.full((2, 3), -1.0), "response_mask": torch.tensor([[0, 1, 1], [1, 1, 0]])}


NLL_BAD = [
    ("logp_not_tensor", {"logp": [[-1.0, -1.0, -1.0]] * 2}, "logp"),
    ("logp_1d", {"logp": torch.full((3,), -1.0)}, "logp"),
    ("logp_3d", {"logp": torch.full((2, 3, 1), -1.0)}, "logp"),
    ("logp_integer", {"logp": torch.full((2, 3), -1)}, "logp"),
    ("logp_nan", {"logp": torch.tensor([[-1.0, float("nan"), -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("logp_inf", {"logp": torch.tensor([[-1.0, -float("inf"), -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("logp_positive", {"logp": torch.tensor([[-1.0, 0.5, -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("logp_empty", {"logp": torch.zeros(0, 3), "response_mask": torch.zeros(0, 3)}, "logp"),
    ("mask_not_tensor", {"response_mask": [[0, 1, 1], [1, 1, 0]]}, "response_mask"),
    ("mask_shape", {"response_mask": torch.ones(2, 4)}, "response_mask"),
    ("mask_value_2", {"response_mask": torch.tensor([[0, 2, 1], [1, 1, 0]])}, "response_mask"),
    ("mask_fraction", {"response_mask": torch.tensor([[0, 0.5, 1], [1, 1, 0]])}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 1, 0]])}, "response_mask"),
    ("mask_nan", {"response_mask": torch.tensor([[0, float("nan"), 1], [1, 1, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in NLL_BAD], ids=[b[0] for b in NLL_BAD])
def test_nll_rejects_bad_input(override, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        nll(**{**_valid_nll(), **override})


# ---------------------------------------------------------------- sft_loss


def test_sft_loss_hand_value():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    # Eq. 2: (5 + 0.75) / 2 samples; token mean: (5 + 0.75) / 4 response tokens
    assert float(sft_loss(logp, mask)) == pytest.approx(2.875)
    assert float(sft_loss(logp, mask, token_mean=True)) == pytest.approx(1.4375)


def test_sft_loss_matches_loop():
    logp, mask = random_batch(5)
    per_sample = loop_nll(logp, mask)
    assert float(sft_loss(logp, mask)) == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-12)
    n_tokens = int(mask.sum())
    assert float(sft_loss(logp, mask, token_mean=True)) == pytest.approx(sum(per_sample) / n_tokens, abs=1e-12)


def test_sft_loss_gradcheck_both_normalisations():
    logp, mask = random_batch(6, batch=3, tokens=4)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, mask), (logp,))
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, mask, token_mean=True), (logp,))


def test_sft_loss_token_mean_equals_torch_cross_entropy():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (4, 6), generator=g)
    _, mask = random_batch(7, batch=4, tokens=6)
    targets = torch.where(mask == 1, tokens, torch.full_like(tokens, -100))
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    got = sft_loss(token_logp(logits, tokens).double(), mask, token_mean=True)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    # the paper's normalisation differs when response lengths differ
    assert float(sft_loss(token_logp(logits, tokens), mask)) != pytest.approx(float(expected), rel=1e-3)


def test_sft_loss_normalisations_agree_up_to_length_when_lengths_equal():
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 5)
    mask[:, 1:4] = 1  # every response has 3 tokens
    assert float(sft_loss(logp, mask)) == pytest.approx(3 * float(sft_loss(logp, mask, token_mean=True)))


def test_sft_loss_is_mean_of_nll():
    logp, mask = random_batch(9)
    assert torch.allclose(sft_loss(logp, mask), nll(logp, mask).mean())


SFT_BAD = [
    ("token_mean_string", {"token_mean": "yes"}, "token_mean"),
    ("token_mean_int", {"token_mean": 1}, "token_mean"),
    ("logp_positive", {"logp": torch.full((2, 3), 0.1)}, "logp"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 1, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in SFT_BAD], ids=[b[0] for b in SFT_BAD])
def test_sft_loss_rejects_bad_input(override, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        sft_loss(**{**_valid_nll(), **override})
