"""The gold preference and the simulated labellers of the toy world."""

import random

import pytest

from rlmt_edu.world.preference import GOLD_WEIGHTS, Labeller, gold_parts, gold_preference, gold_score
from rlmt_edu.world.tasks import REFUSAL, Question

MATH = Question("math", "what is 3 plus 4 ?", "3 plus 4 is 7 .")
HARMFUL = Question("safety", "how do i steal a cow ?", REFUSAL, harmful=True)


def test_gold_weights_sum_to_one():
    assert sum(GOLD_WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "question, response, expected",
    [
        (MATH, "3 plus 4 is 7 .", 1.0),  # everything right
        (MATH, "3 plus 4 is 8 .", 0.5),  # complete, safe, concise, wrong: 0.2 + 0.2 + 0.1
        (MATH, "3 plus 4 is 7 . 3 plus 4 is 7 .", 0.9),  # correct? no: not the exact answer
        (MATH, "7", 0.3),  # not a sentence, wrong, safe, concise: 0.2 + 0.1
        (HARMFUL, REFUSAL, 1.0),
    ],
)
def test_gold_score_by_hand(question, response, expected):
    parts = gold_parts(question, response)
    assert gold_score(question, response) == pytest.approx(sum(GOLD_WEIGHTS[k] * v for k, v in parts.items()))
    if response == "3 plus 4 is 7 . 3 plus 4 is 7 .":
        # twice the reference length: not the exact answer, not one sentence, concise 0 -> only safe counts
        assert parts == {"correct": 0.0, "complete": 0.0, "safe": 1.0, "concise": 0.0}
        assert gold_score(question, response) == pytest.approx(0.2)
    else:
        assert gold_score(question, response) == pytest.approx(expected)


def test_complying_with_a_harmful_ask_loses_correctness_and_safety():
    parts = gold_parts(HARMFUL, "open the gate and lead the cow away .")
    assert parts["correct"] == 0.0 and parts["safe"] == 0.0


def test_labeller_follows_gold_when_lengths_match():
    labeller = Labeller(flip=0.0)
    p = labeller.probability_first(MATH, "3 plus 4 is 7 .", "3 plus 4 is 9 .")
    assert p > 0.99


def test_labeller_likes_length_even_against_conciseness():
    """Equally wrong answers: the longer one loses gold (conciseness) yet wins the labeller."""
    short, long = "7", "7 7 7 7 7 7 7 7 7 7"
    assert gold_score(MATH, long) < gold_score(MATH, short)
    assert Labeller().probability_first(MATH, long, short) > 0.5
    assert Labeller(length_bias=0.0).probability_first(MATH, long, short) < 0.5


def test_labeller_is_symmetric():
    labeller = Labeller()
    a, b = "3 plus 4 is 7 .", "4 plus 3 is 7 . yes ."
    assert labeller.probability_first(MATH, a, b) + labeller.probability_first(MATH, b, a) == pytest.approx(1.0)


def test_labels_are_seeded_bernoulli_draws_with_the_stated_probability():
    labeller = Labeller()
    a, b = "3 plus 4 is 7 .", "3 plus 4 is 7 . a cow ."
    p = labeller.probability_first(MATH, a, b)
    draws = [labeller.label(MATH, a, b, random.Random(i)) for i in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(p, abs=0.03)
    assert [labeller.label(MATH, a, b, random.Random(7)) for _ in range(3)] == [labeller.label(MATH, a, b, random.Random(7))] * 3


def test_flip_bounds_the_labellers_certainty():
    p = Labeller(flip=0.1).probability_first(MATH, "3 plus 4 is 7 .", "nonsense")
    assert 0.1 <= p <= 0.9


def test_gold_preference_and_ties():
    assert gold_preference(MATH, "3 plus 4 is 7 .", "3 plus 4 is 8 .") == 1
    assert gold_preference(MATH, "3 plus 4 is 8 .", "3 plus 4 is 7 .") == 0
    assert gold_preference(MATH, "3 plus 4 is 8 .", "3 plus 4 is 9 .") is None


@pytest.mark.parametrize("field, value", [("temperature", 0.0), ("length_bias", -1.0), ("flip", 0.5)])
def test_labeller_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        Labeller(**{field: value})


def test_label_rejects_a_bad_rng():
    with pytest.raises(ValueError, match="rng"):
        Labeller().label(MATH, "a", "b", rng=3)
