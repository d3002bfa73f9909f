"""Chapter 10: the naive preference loss and DPO (§4.9) on encoded pairs: sequence log-probs, the reference
computed once, validation of pairs and of the reference, the win rate, and a short seeded run that learns."""

import copy
import math

import pytest
import torch

from rlmt_edu import rl
from rlmt_edu.algorithms.dpo import (
    DPOConfig,
    dpo,
    dpo_step,
    encode_pair_batch,
    gold_win_rate,
    heldout_pair_accuracy,
    pair_logps,
    pairs_with_responses,
)
from rlmt_edu.algorithms.preference_data import load_preference_pairs
from rlmt_edu.algorithms.reward_model import response_logprob
from rlmt_edu.model import load_checkpoint
from rlmt_edu.paths import SFT

needs_sft = pytest.mark.skipif(not (SFT / "config.json").is_file(), reason="the SFT checkpoint is not built yet")


@pytest.fixture(scope="module")
def sft():
    model, tokenizer = load_checkpoint(SFT)
    return model.requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def pairs():
    kept, _ = pairs_with_responses(load_preference_pairs("train"))
    return kept


def test_pairs_with_responses_leaves_out_exactly_the_pairs_with_an_empty_response():
    all_pairs = load_preference_pairs("train")
    kept, dropped = pairs_with_responses(all_pairs)
    assert dropped == sum(1 for p in all_pairs if not p.chosen.strip() or not p.rejected.strip()) >= 1
    assert len(kept) + dropped == len(all_pairs)


@needs_sft
def test_pair_logps_sum_the_response_tokens_and_eos_as_the_reward_model_scorer_does(sft, pairs):
    model, tokenizer = sft
    chosen_pairs = pairs[:6]
    batch = encode_pair_batch(tokenizer, chosen_pairs, reference=model)
    logp_chosen, logp_rejected = pair_logps(model, batch)
    questions = [p.question.question for p in chosen_pairs]
    for texts, summed in (([p.chosen for p in chosen_pairs], logp_chosen), ([p.rejected for p in chosen_pairs], logp_rejected)):
        mean = response_logprob(model, tokenizer, questions, texts)  # mean over response tokens and <EOS>
        counts = torch.tensor([len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts])
        torch.testing.assert_close(summed, mean * counts, atol=1e-4, rtol=1e-5)
    # the reference's log-probs were computed once, and equal the policy's at the start
    torch.testing.assert_close(batch.logp_ref_chosen, logp_chosen)


@needs_sft
def test_a_selected_batch_drops_padding_columns_and_keeps_the_scores(sft, pairs):
    model, tokenizer = sft
    batch = encode_pair_batch(tokenizer, pairs[:64], reference=model)
    part = batch.select(torch.tensor([3, 10]))
    assert part.input_ids.shape[1] <= batch.input_ids.shape[1]
    chosen, rejected = pair_logps(model, part)
    torch.testing.assert_close(chosen, batch.logp_ref_chosen[[3, 10]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, batch.logp_ref_rejected[[3, 10]], atol=1e-5, rtol=1e-5)


@needs_sft
def test_the_first_dpo_step_has_loss_log_2_and_moves_chosen_above_rejected(sft, pairs):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    batch = encode_pair_batch(tokenizer, pairs[:16], reference=model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    row = dpo_step(policy, optimizer, batch, DPOConfig(beta=0.1))
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, batch)
    margin = (chosen - batch.logp_ref_chosen) - (rejected - batch.logp_ref_rejected)
    assert margin.mean() > 0  # one step along -∇ loss raises the implied reward margin


@needs_sft
def test_the_naive_loss_needs_no_reference_and_dpo_refuses_to_run_without_one(sft, pairs):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    batch = encode_pair_batch(tokenizer, pairs[:8])  # no reference
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    row = dpo_step(policy, optimizer, batch, DPOConfig(loss="naive"))
    assert row["loss"] > 0 and "dpo/reward_margin" not in row
    with pytest.raises(ValueError, match="batch: expected the reference's log-probs for DPO"):
        dpo_step(policy, optimizer, batch, DPOConfig())


# ---- bad input ------------------------------------------------------------------------------------------------------


@needs_sft
@pytest.mark.parametrize("bad, message", [
    (("what is 2 plus 2 ?", "", "2 plus 2 is 4 ."), r"pairs\[0\]: expected a non-empty chosen response"),
    (("what is 2 plus 2 ?", "2 plus 2 is 4 .", "  "), r"pairs\[0\]: expected a non-empty rejected response"),
    (("what is 2 plus 2 ?", "2 plus 2 is 4 .", "2 plus 2 is 4 ."), r"pairs\[0\]: expected different chosen and rejected"),
    (("what is 2 plus 2 ?", "2 plus 2 is 4 ."), r"pairs\[0\]: expected a PreferencePair or a \(question, chosen, rejected\)"),
])
def test_bad_pairs_are_refused_by_index(sft, bad, message):
    _, tokenizer = sft
    with pytest.raises(ValueError, match=message):
        encode_pair_batch(tokenizer, [bad])


@needs_sft
def test_a_reference_that_requires_grad_is_refused(sft, pairs):
    model, tokenizer = sft
    with pytest.raises(ValueError, match="reference: expected a frozen model"):
        encode_pair_batch(tokenizer, pairs[:2], reference=copy.deepcopy(model).requires_grad_(True))
    policy = copy.deepcopy(model).requires_grad_(True)
    with pytest.raises(ValueError, match="reference: expected a frozen copy of the start model"):
        dpo(policy, tokenizer, pairs[:64], reference=policy, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("loss", "ipo", "loss"), ("beta", 0.0, "beta"), ("steps", 0, "steps: expected an int >= 1"),
    ("batch_size", 0, "batch_size: expected an int >= 1"), ("learning_rate", -1e-5, "learning_rate"),
])
def test_bad_configs_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**{field: value})


# ---- measuring --------------------------------------------------------------------------------------------------


@needs_sft
def test_a_model_against_itself_wins_half_and_the_counts_add_up(sft):
    model, tokenizer = sft
    questions = rl.heldout_questions()[:20]
    result = gold_win_rate(model, model, tokenizer, questions, samples=2, seed=3)
    assert result["wins"] == result["losses"] == 0 and result["ties"] == 40 and result["win_rate"] == 0.5


@needs_sft
def test_at_the_start_every_implied_margin_is_zero_and_counts_as_a_tie(sft):
    model, tokenizer = sft
    batch = encode_pair_batch(tokenizer, load_preference_pairs("heldout")[:32], reference=model)
    scores = heldout_pair_accuracy(model, batch, beta=0.1)
    assert scores["pairs/label_accuracy"] == pytest.approx(0.5) and scores["pairs/gold_accuracy"] == pytest.approx(0.5)


@needs_sft
@pytest.mark.slow
def test_a_short_seeded_dpo_run_raises_the_margin_and_the_naive_loss_pushes_both_down(sft, pairs):
    model, tokenizer = sft
    heldout = load_preference_pairs("heldout")[:128]
    runs = {}
    for loss in ("dpo", "naive"):
        policy = copy.deepcopy(model).requires_grad_(True)
        runs[loss] = dpo(policy, tokenizer, pairs, DPOConfig(loss=loss, steps=40, eval_every=40), reference=model,
                         heldout_pairs=heldout, progress=False)
    history = runs["dpo"]
    assert sum(row["dpo/reward_margin"] for row in history[-10:]) / 10 > 0.005  # the margin grew on training pairs
    assert history[-1]["pairs/label_accuracy"] > 0.52  # held-out implied margins now mostly go the labels' way
    naive = runs["naive"]
    assert naive[-1]["pairs/logp_rejected"] < naive[0]["pairs/logp_rejected"]
    assert naive[-1]["pairs/logp_chosen"] < naive[0]["pairs/logp_chosen"]  # the chosen texts lose probability too
