"""Chapter 05: the reward model of §4.4 (Eq. 5–6) learns the labelled preferences, and their length bias."""

import json

import numpy as np
import pytest
import torch

from rlmt_edu.algorithms.preference_data import PreferencePair, load_preference_pairs
from rlmt_edu.algorithms.reward_model import (
    REWARD_MODEL_DIR,
    RewardModelConfig,
    check_vocabulary,
    encode_texts,
    evaluate_reward_model,
    length_bias,
    load_reward_model,
    response_logprob,
    reward_model_from_checkpoint,
    reward_model_metrics,
    reward_model_scores,
    save_reward_model,
    train_reward_model,
)
from rlmt_edu.chapters import SFT
from rlmt_edu.model import ModelConfig, build_model, load_checkpoint, save_checkpoint, sequence_logprobs
from rlmt_edu.tokenizer import build_tokenizer, encode_chat, encode_prompt
from rlmt_edu.world.tasks import Question
from rlmt_edu.world.vocab import vocabulary, world_tokenizer

MATH = Question("math", "what is 3 plus 4 ?", "3 plus 4 is 7 .")
TINY = ModelConfig(n_layer=1, n_head=1, n_embd=8, n_positions=64)


# ---- learning ---------------------------------------------------------------------------------------------


def test_a_short_run_learns_the_preferences():
    """§4.4's readout (a head at <EOS>), 40 steps on 640 pairs: the loss falls and held-out accuracy (labels
    and gold) rises above chance."""
    train = load_preference_pairs("train")[::5][:640]
    heldout = load_preference_pairs("heldout")[::2][:240]
    config = RewardModelConfig(steps=40, batch_size=16, warmup_steps=5, eval_every=40, readout="last",
                               learning_rate=1e-3)  # the "last" readout's learning rate
    model, history = train_reward_model(train, config, heldout=heldout, device="cpu", progress=False)
    losses = history.series("loss/reward_model")[1]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    _, accuracy = history.series("heldout/accuracy")
    _, gold_accuracy = history.series("heldout/gold_accuracy")
    # an untrained head ranks at about chance; 240 held-out pairs: chance ± 0.032 (1 sd), so > 0.58 is > 2.5 sd.
    # (measured: 0.478 -> 0.616 vs labels, 0.504 -> 0.610 vs gold; with lr 2e-4 it reached only 0.525 vs gold)
    assert accuracy[0] < 0.55
    assert accuracy[-1] > 0.58 and accuracy[-1] > accuracy[0] + 0.1
    assert gold_accuracy[-1] > 0.58 and gold_accuracy[-1] > gold_accuracy[0] + 0.05
    # Eq. (5) (chosen first, hp = 1; or in the recorded order with the recorded hp) equals Eq. (6) every step
    for key in ("loss/reward_function_eq5", "loss/reward_function_eq5_ij"):
        assert history.series(key)[1] == pytest.approx(losses, abs=1e-5)


def test_training_is_deterministic_in_the_seed():
    train = load_preference_pairs("train")[:64]
    config = RewardModelConfig(steps=3, batch_size=8, eval_every=3)
    _, first = train_reward_model(train, config, device="cpu", progress=False)
    _, second = train_reward_model(train, config, device="cpu", progress=False)
    assert first.series("loss/reward_model") == second.series("loss/reward_model")
    _, other = train_reward_model(train, RewardModelConfig(steps=3, batch_size=8, eval_every=3, seed=1),
                                  device="cpu", progress=False)
    assert other.series("loss/reward_model") != first.series("loss/reward_model")  # the seed orders the pairs


# ---- bad input -------------------------------------------------------------------------------------------


def test_training_rejects_bad_pairs_naming_the_item():
    good = PreferencePair(MATH, "3 plus 4 is 7 .", "3 plus 4 is 8 .", hp=1).to_record()
    same = dict(good, response_j=good["response_i"])
    with pytest.raises(ValueError, match=r"pairs\[1\].*response_j"):
        train_reward_model([good, same], RewardModelConfig(steps=1), progress=False)
    texts = ("<USER> what is 3 plus 4 ? <MODEL> 7 . <EOS>", "<USER> what is 3 plus 4 ? <MODEL> 8 . <EOS>")
    with pytest.raises(ValueError, match=r"pairs\[0\]: expected a PreferencePair or a record dict"):
        train_reward_model([texts], RewardModelConfig(steps=1), progress=False)  # valid, but cannot be graded
    different_prompts = ("<USER> what is 3 plus 4 ? <MODEL> 7 . <EOS>", "<USER> what is 3 plus 5 ? <MODEL> 8 . <EOS>")
    with pytest.raises(ValueError, match=r"heldout\[0\].*prompt"):
        train_reward_model([good], RewardModelConfig(steps=1), heldout=[different_prompts], progress=False)
    with pytest.raises(ValueError, match="pairs"):
        train_reward_model([], RewardModelConfig(steps=1), progress=False)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 0), ("learning_rate", 0.0), ("learning_rate", float("nan")),
     ("weight_decay", -1.0), ("eval_every", 0), ("max_grad_norm", 0.0), ("seed", -1)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RewardModelConfig(**{field: value})


def test_checkpoint_of_another_vocabulary_is_rejected(tmp_path):
    other = build_tokenizer(["apple", "pear", "plum"])
    save_checkpoint(build_model(other, TINY), other, tmp_path / "other")
    with pytest.raises(ValueError, match="init.*vocabulary"):
        reward_model_from_checkpoint(tmp_path / "other")


def test_checkpoint_whose_tokenizer_does_not_fit_its_model_is_rejected(tmp_path):
    world = world_tokenizer()
    bigger = build_tokenizer([*vocabulary(), "dragon"])  # the world's words plus one
    save_checkpoint(build_model(world, TINY), bigger, tmp_path / "mismatch")
    with pytest.raises(ValueError, match=r"init.*vocabulary size"):
        reward_model_from_checkpoint(tmp_path / "mismatch")


def test_check_vocabulary_names_its_argument():
    model, tokenizer = reward_model_from_checkpoint(SFT)
    check_vocabulary(model, tokenizer)  # the SFT checkpoint passes
    with pytest.raises(ValueError, match=r"^tokenizer: expected a tokenizer of the model's vocabulary size"):
        check_vocabulary(model, build_tokenizer(["apple"]))
    with pytest.raises(ValueError, match=r"^init: "):
        check_vocabulary(model, build_tokenizer(["apple"]), argument="init")


# ---- scoring ---------------------------------------------------------------------------------------------


def test_reward_reads_the_last_real_token_whatever_the_padding():
    model, tokenizer = reward_model_from_checkpoint(SFT)
    questions = ["what is 3 plus 4 ?", "how many legs does a spider have ?", "what is 3 plus 4 ?"]
    responses = ["3 plus 4 is 7 .", "a spider has 8 legs . a spider has 8 legs .", ""]
    ids, mask = encode_texts(tokenizer, questions, responses)
    assert tokenizer.padding_side == "right" and model.config.pad_token_id == tokenizer.pad_token_id
    assert ids[0, -1] == tokenizer.pad_token_id and ids[1, int(mask[1].sum()) - 1] == tokenizer.eos_token_id
    together = reward_model_scores(model, tokenizer, questions, responses)  # (3,)
    alone = torch.cat([reward_model_scores(model, tokenizer, [q], [r]) for q, r in zip(questions, responses)])
    assert together.shape == (3,)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[2])  # the response changes the reward


def test_length_bias_recovers_known_slopes_per_group_and_within_questions():
    """Correct responses gain 0.5 per word, incorrect ones 0.2 within a question; question "d" is simply worth
    10 more, which the pooled incorrect slope mistakes for length and the within-question slope removes."""
    words = np.array([3, 4, 5, 6, 5, 6, 9, 10], dtype=float)
    correct = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    question = np.array(list("aabbccdd"))
    reward = np.where(correct, 0.5, 0.2) * words + 2.0 * correct + 10.0 * (question == "d")
    gold = np.where(correct, 1.0, 0.2 + 0.01 * words)  # wrong answers: gold rises 0.01 per word
    slopes = length_bias({"words": words, "correct": correct, "reward": reward, "gold": gold, "question": question})
    assert slopes["length/slope_correct"] == pytest.approx(0.5)
    assert slopes["length/slope_incorrect_within"] == pytest.approx(0.2)
    assert slopes["length/slope_incorrect"] > 1.0  # pooled across questions: question d's +10 looks like length
    assert slopes["length/gold_slope_correct"] == pytest.approx(0.0, abs=1e-9)
    assert slopes["length/gold_slope_incorrect"] == pytest.approx(0.1)  # 0.01 per word / temperature 0.1
    assert slopes["length/gold_slope_incorrect_within"] == pytest.approx(0.1)
    assert (slopes["length/n_correct"], slopes["length/n_incorrect"]) == (4, 4)


# ---- the committed reward model -------------------------------------------------------------------------


def test_committed_reward_model_ranks_by_gold_and_learned_the_length_bias():
    meta = json.loads((REWARD_MODEL_DIR / "rlmt_edu.json").read_text())
    assert meta["config"] == json.loads(json.dumps(__import__("dataclasses").asdict(RewardModelConfig())))
    assert sum(f.stat().st_size for f in REWARD_MODEL_DIR.iterdir()) < 8 * 2**20  # a few MB
    metrics = meta["metrics"]
    # good: near the ceiling of what the labels allow (labels agree with gold 0.85; an ideal label predictor 0.89)
    assert metrics["heldout/gold_accuracy"] >= 0.80  # 281 gold pairs
    assert metrics["heldout/gold_accuracy/math/correctness"] >= 0.80  # checks sums on unseen questions
    assert metrics["heldout/gold_accuracy/safety/correctness"] > 0.9  # refusing / helping
    # flawed, measured within questions: where gold ties, it prefers the longer response far above one half
    # (216 such train pairs: sd of a coin 0.034), more often than the labellers themselves did
    assert metrics["train/length/longer_preferred"] > 0.75
    assert metrics["train/length/longer_preferred"] > metrics["train/length/labels_longer"]
    assert metrics["heldout/length/slope_within"] > 0 > metrics["heldout/length/gold_slope_within"]
    # every saved number is re-measured from the saved weights (inference only: equal up to float rounding,
    # so up to one pair of 405 flipping on another CPU)
    model, tokenizer = load_reward_model()
    measured = reward_model_metrics(model, tokenizer, load_preference_pairs("train"), load_preference_pairs("heldout"))
    assert measured.keys() == metrics.keys()
    for key, value in metrics.items():
        assert measured[key] == pytest.approx(value, abs=3e-3), key


def test_response_logprob_is_the_mean_token_logprob_of_the_response_alone():
    """The reference scorer of section 7: mean log π(a_t | s_t) over the response's tokens and <EOS>, computed
    in a padded batch, equals the same number computed by hand for each text alone."""
    lm, tokenizer = load_checkpoint(SFT)
    questions = ["what is 3 plus 4 ?", "how many legs does a spider have ?"]
    responses = ["3 plus 4 is 7 .", "a spider has 8 legs . a spider has 8 legs ."]
    batched = response_logprob(lm, tokenizer, questions, responses)
    for k, (question, response) in enumerate(zip(questions, responses)):
        ids, _ = encode_chat(tokenizer, question, response)
        with torch.no_grad():
            logp = sequence_logprobs(lm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        n_prompt = len(encode_prompt(tokenizer, question))
        by_hand = logp[n_prompt - 1:].mean()  # column t scores token t + 1: the response starts at n_prompt
        assert batched[k].item() == pytest.approx(by_hand.item(), abs=1e-5)
    wrong = response_logprob(lm, tokenizer, questions[:1], ["3 plus 4 is 9 ."])
    assert wrong[0] < batched[0]  # the SFT model finds the wrong sum less likely


def test_load_reward_model_refuses_a_causal_lm_checkpoint():
    with pytest.raises(ValueError, match="path"):
        load_reward_model(SFT)


@pytest.mark.slow
def test_the_committed_recipe_reproduces_the_committed_metrics():
    """Re-training with ``run_reward_model``'s defaults gives a model of the committed quality (~25 s quiet CPU).

    Bit-identical only on the CPU and thread count that made the checkpoint (measured: two runs on the
    committed machine agree to every digit). Elsewhere the 8th-digit rounding differences grow over 200 steps,
    so the headline accuracies must agree within 0.04; the per-kind accuracies (a few dozen pairs each) are
    not compared; numbers that depend on the data alone must agree exactly.
    """
    from rlmt_edu.algorithms.reward_model import run_reward_model

    saved = json.loads((REWARD_MODEL_DIR / "rlmt_edu.json").read_text())["metrics"]
    _, _, metrics = run_reward_model(out=None, device="cpu", progress=False)
    assert metrics.keys() == saved.keys()
    for key in ("heldout/accuracy", "heldout/gold_accuracy", "train/accuracy", "train/gold_accuracy", "heldout/loss"):
        assert metrics[key] == pytest.approx(saved[key], abs=0.04), key
    data_only = [k for k in saved if k == "heldout/label_gold_agreement" or "gold_slope" in k or "/n_" in k
                 or "labels_longer" in k or "tie_pairs" in k]
    assert len(data_only) == 11
    for key in data_only:
        assert metrics[key] == pytest.approx(saved[key], abs=1e-4), key
    assert metrics["heldout/gold_accuracy"] >= 0.78 and metrics["train/length/longer_preferred"] > 0.7


def test_a_critic_checkpoint_is_refused_as_the_start_of_a_reward_model(tmp_path):
    from rlmt_edu.model import build_value_model, save_checkpoint

    critic = build_value_model(SFT)
    _, tokenizer = reward_model_from_checkpoint(SFT)
    save_checkpoint(critic, tokenizer, tmp_path / "critic")
    with pytest.raises(ValueError, match="init: expected a language model or a reward model checkpoint.*critic"):
        reward_model_from_checkpoint(tmp_path / "critic")


# ---- the likelihood readout (GPT2RewardModel) -----------------------------------------------------------


def test_the_likelihood_readout_starts_as_the_sft_models_mean_log_likelihood():
    model, tokenizer = reward_model_from_checkpoint(SFT)  # readout="likelihood", the default
    lm, _ = load_checkpoint(SFT)
    questions = ["what is 3 plus 4 ?", "what is 3 plus 4 ?", "how do i hurt a cat ?"]
    responses = ["3 plus 4 is 7 .", "3 plus 4 is 9 .", "sorry , i can not help with that ."]
    rewards = reward_model_scores(model, tokenizer, questions, responses)
    torch.testing.assert_close(rewards, response_logprob(lm, tokenizer, questions, responses), atol=1e-5, rtol=0)
    assert rewards[0] > rewards[1]  # before any training, the wrong sum is less likely, so worth less


def test_the_likelihood_readout_trains_saves_and_loads_with_all_it_learned(tmp_path):
    from rlmt_edu.model import GPT2RewardModel, build_likelihood_reward_model

    train = load_preference_pairs("train")[:64]
    model, _ = train_reward_model(train, RewardModelConfig(steps=3, batch_size=8, eval_every=3), device="cpu",
                                  progress=False)
    assert isinstance(model, GPT2RewardModel)
    assert model.likelihood_weight.item() != 1.0 and model.score.weight.abs().sum() > 0  # both parts moved
    _, tokenizer = reward_model_from_checkpoint(SFT)
    save_reward_model(model, tokenizer, tmp_path / "rm")
    loaded, _ = load_reward_model(tmp_path / "rm")
    questions, responses = ["what is 3 plus 4 ?"] * 2, ["3 plus 4 is 7 .", "3 plus 4 is 7 . 3 plus 4 is 7 ."]
    torch.testing.assert_close(reward_model_scores(loaded, tokenizer, questions, responses),
                               reward_model_scores(model, tokenizer, questions, responses), atol=0, rtol=0)
    with pytest.raises(ValueError, match="path: expected a language model checkpoint.*reward model"):
        load_checkpoint(tmp_path / "rm")  # never mistaken for a policy
    with pytest.raises(ValueError, match="response_token_id: expected the <MODEL> token id"):
        build_likelihood_reward_model(SFT)
    ids, mask = encode_texts(tokenizer, questions[:1], responses[:1])
    no_marker = ids.masked_fill(ids == loaded.response_token_id, tokenizer.convert_tokens_to_ids("cat"))
    with pytest.raises(ValueError, match="input_ids: expected a <MODEL> token in every row"):
        loaded.rewards(no_marker, mask)  # where does the response start? refused, not guessed


def test_the_last_token_readout_of_section_4_4_is_still_there():
    model, tokenizer = reward_model_from_checkpoint(SFT, readout="last")
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    scores = reward_model_scores(model, tokenizer, ["what is 3 plus 4 ?"], ["3 plus 4 is 7 ."])
    assert scores.shape == (1,)
    with pytest.raises(ValueError, match="readout: expected one of"):
        reward_model_from_checkpoint(SFT, readout="mean")
    with pytest.raises(ValueError, match="readout: expected one of"):
        RewardModelConfig(readout="mean")


def test_length_preference_within_questions_counts_gold_ties_of_different_length_only():
    from rlmt_edu.algorithms.preference_data import PreferencePair
    from rlmt_edu.algorithms.reward_model import length_preference_within_questions
    from rlmt_edu.world.tasks import Question

    q = Question("safety", "how do i hurt a cat ?", "sorry , i can not help with that .", True)
    pairs = [PreferencePair(q, "a b c", "a b", 1, 0.1, 0.1),  # tie, i longer, labels chose i
             PreferencePair(q, "a", "a b c d", 1, 0.1, 0.1),  # tie, j longer, labels chose i (the shorter)
             PreferencePair(q, "a b", "c d", 1, 0.1, 0.1),  # tie, same length: not counted
             PreferencePair(q, "a b c", "a", 1, 0.5, 0.1)]  # gold differs: not counted
    out = length_preference_within_questions([2.0, 0.0, 5.0, 9.0], [1.0, 1.0, 0.0, 0.0], pairs)
    # the scorer ranks the longer response first in both ties; the labels did in one of the two
    assert out == {"length/longer_preferred": 1.0, "length/labels_longer": 0.5, "length/tie_pairs": 2}
    out = length_preference_within_questions([0.0, 0.0, 5.0, 9.0], [1.0, 1.0, 0.0, 0.0], pairs)
    assert out["length/longer_preferred"] == 0.5
    with pytest.raises(ValueError, match="rewards_j: expected one reward per pair"):
        length_preference_within_questions([1.0], [1.0, 2.0], pairs)


def test_reward_model_reward_is_an_rl_reward_function():
    from rlmt_edu.algorithms.reward_model import reward_model_reward
    from rlmt_edu.rl import prompt_pool, score_responses

    model, tokenizer = load_reward_model()
    questions = prompt_pool("math")[:3]
    responses = [q.answer for q in questions]
    rewards = score_responses(reward_model_reward(model, tokenizer), questions, responses)  # checked (B,)
    torch.testing.assert_close(rewards, reward_model_scores(model, tokenizer, [q.question for q in questions],
                                                            responses))
