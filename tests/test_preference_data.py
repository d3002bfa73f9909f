"""The preference pairs of §3 / §4.4: validation, the committed files, and their regeneration."""

import json
import random

import pytest

from rlmt_edu.algorithms.preference_data import (
    PAIR_FILES,
    PreferenceDataConfig,
    PreferencePair,
    check_pair_texts,
    generate_preference_data,
    length_spread,
    load_preference_pairs,
    make_preference_pairs,
    preference_pairs_from,
    split_chat_text,
    split_questions,
)
from rlmt_edu.world.data import DATA_DIR, load_questions, to_jsonl
from rlmt_edu.world.preference import Labeller, gold_score
from rlmt_edu.world.tasks import Question, make_split

MATH = Question("math", "what is 3 plus 4 ?", "3 plus 4 is 7 .")


def _records(split):
    with (DATA_DIR / PAIR_FILES[split]).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---- validation ------------------------------------------------------------------------------------------


def test_pair_chosen_and_rejected_follow_hp():
    pair = PreferencePair(MATH, "3 plus 4 is 7 .", "3 plus 4 is 8 .", hp=0)
    assert (pair.chosen, pair.rejected) == ("3 plus 4 is 8 .", "3 plus 4 is 7 .")
    flipped = PreferencePair(MATH, "3 plus 4 is 7 .", "3 plus 4 is 8 .", hp=1, gold_i=1.0, gold_j=0.5)
    assert (flipped.chosen, flipped.rejected) == ("3 plus 4 is 7 .", "3 plus 4 is 8 .")
    assert flipped.gold_preference == 1
    assert PreferencePair.from_record(flipped.to_record()) == flipped


@pytest.mark.parametrize("response_j", ["3 plus 4 is 7 .", "3 PLUS 4 is 7.", "  3 plus 4 is 7 .  "])
def test_identical_responses_are_rejected(response_j):
    with pytest.raises(ValueError, match="response_j"):
        PreferencePair(MATH, "3 plus 4 is 7 .", response_j, hp=1)


def test_pair_texts_with_different_prompts_are_rejected():
    with pytest.raises(ValueError, match="prompt_j"):
        check_pair_texts("what is 3 plus 4 ?", "7 .", "what is 3 plus 5 ?", "8 .")
    check_pair_texts("what is 3 plus 4 ?", "7 .", "What is 3 plus 4?", "8 .")  # same prompt, normal form


@pytest.mark.parametrize(
    "field, value, match",
    [("hp", 2, "hp"), ("hp", True, "hp"), ("gold_i", 1.5, "gold_i"), ("gold_j", float("nan"), "gold_j")],
)
def test_pair_fields_are_validated(field, value, match):
    kwargs = dict(question=MATH, response_i="7 .", response_j="8 .", hp=1, gold_i=0.3, gold_j=0.3)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        PreferencePair(**kwargs)


def test_record_whose_chosen_disagrees_with_hp_is_rejected():
    record = PreferencePair(MATH, "7 .", "8 .", hp=1).to_record()
    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    with pytest.raises(ValueError, match="chosen"):
        PreferencePair.from_record(record)


def test_loader_accepts_pairs_records_and_chat_texts():
    pair = PreferencePair(MATH, "3 plus 4 is 7 .", "3 plus 4 is 8 .", hp=1)
    texts = ("<USER> what is 3 plus 4 ? <MODEL> 3 plus 4 is 7 . <EOS>", "<USER> what is 3 plus 4 ? <MODEL> 8 <EOS>")
    loaded = preference_pairs_from([pair, pair.to_record(), texts])
    assert loaded == [("what is 3 plus 4 ?", "3 plus 4 is 7 .", "3 plus 4 is 8 ."),
                      ("what is 3 plus 4 ?", "3 plus 4 is 7 .", "3 plus 4 is 8 ."),
                      ("what is 3 plus 4 ?", "3 plus 4 is 7 .", "8")]


def test_loader_rejects_different_prompts_and_identical_texts_naming_the_item():
    good = PreferencePair(MATH, "7 .", "8 .", hp=1)
    different_prompts = ("<USER> what is 3 plus 4 ? <MODEL> 7 . <EOS>", "<USER> what is 3 plus 5 ? <MODEL> 8 . <EOS>")
    with pytest.raises(ValueError, match=r"pairs\[1\].*prompt"):
        preference_pairs_from([good, different_prompts])
    same_text = ("<USER> what is 3 plus 4 ? <MODEL> 7 . <EOS>", "<USER> what is 3 plus 4 ? <MODEL> 7 .")
    with pytest.raises(ValueError, match=r"pairs\[0\].*different responses"):
        preference_pairs_from([same_text])
    record = good.to_record()
    record["response_j"] = record["response_i"]
    with pytest.raises(ValueError, match=r"pairs\[0\].*response_j"):
        preference_pairs_from([record])
    with pytest.raises(ValueError, match="pairs"):
        preference_pairs_from([])
    with pytest.raises(ValueError, match="text_chosen"):
        split_chat_text("what is 3 plus 4 ? 7 .", "text_chosen")


def test_make_preference_pairs_rejects_bad_arguments():
    kwargs = dict(samples_per_question=4, temperature=1.5, labeller=Labeller(), seed=0)
    with pytest.raises(ValueError, match="samples_per_question"):
        make_preference_pairs(None, None, [MATH], **{**kwargs, "samples_per_question": 1})
    with pytest.raises(ValueError, match="temperature"):
        make_preference_pairs(None, None, [MATH], **{**kwargs, "temperature": 0.0})
    with pytest.raises(ValueError, match="labeller"):
        make_preference_pairs(None, None, [MATH], **{**kwargs, "labeller": "human"})
    with pytest.raises(ValueError, match="questions"):
        make_preference_pairs(None, None, [], **kwargs)
    with pytest.raises(ValueError, match="temperature"):
        PreferenceDataConfig(temperature=0.7)
    with pytest.raises(ValueError, match="heldout_fraction"):
        PreferenceDataConfig(heldout_fraction=1.0)


def test_split_questions_is_disjoint_and_seeded():
    questions = list(make_split(0).train_pool)
    train, heldout = split_questions(questions, 0.15, seed=0)
    assert len(train) + len(heldout) == len(questions)
    assert not {q.question for q in train} & {q.question for q in heldout}
    assert split_questions(questions, 0.15, seed=0) == (train, heldout)
    assert split_questions(questions, 0.15, seed=1) != (train, heldout)


# ---- the committed files ---------------------------------------------------------------------------------


def test_committed_pairs_are_valid_and_split_by_question():
    train, heldout = load_preference_pairs("train"), load_preference_pairs("heldout")
    assert 2000 <= len(train) <= 6000 and 300 <= len(heldout) <= 1500  # a few thousand / several hundred
    train_qs, heldout_qs = {p.question.question for p in train}, {p.question.question for p in heldout}
    assert not train_qs & heldout_qs  # no question on both sides
    pool = {q.question for q in make_split(0).train_pool}
    assert train_qs | heldout_qs <= pool  # train-pool questions only ...
    assert not (train_qs | heldout_qs) & {q.question for q in load_questions("eval")}  # ... never evaluation
    for pair in train[:300] + heldout[:300]:
        assert pair.gold_i == pytest.approx(gold_score(pair.question, pair.response_i), abs=1e-6)
        assert pair.gold_j == pytest.approx(gold_score(pair.question, pair.response_j), abs=1e-6)
    # records carry every field the other chapters read
    assert set(_records("train")[0]) == {"category", "question", "answer", "harmful", "response_i", "response_j",
                                         "hp", "gold_i", "gold_j", "chosen", "rejected"}


def test_committed_responses_vary_in_length_and_the_labels_show_the_length_bias():
    records = _records("train")
    spread = length_spread(records)
    assert spread["words/std"] >= 1.5 and spread["gap/share_nonzero"] >= 0.4
    # Among pairs the gold score cannot tell apart, the labellers pick the LONGER response more often
    ties = [r for r in records if r["gold_i"] == r["gold_j"]
            and len(r["response_i"].split()) != len(r["response_j"].split())]
    longer_chosen = sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in ties)
    assert len(ties) >= 50 and longer_chosen / len(ties) > 0.6


def test_labels_mostly_follow_gold():
    records = _records("train") + _records("heldout")
    decided = [r for r in records if r["gold_i"] != r["gold_j"]]
    agree = sum((r["gold_i"] > r["gold_j"]) == (r["hp"] == 1) for r in decided)
    assert 0.7 < agree / len(decided) < 0.99  # informative, but noisy


# ---- regeneration ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model():
    from rlmt_edu.chapters import SFT
    from rlmt_edu.model import load_checkpoint

    return load_checkpoint(SFT, device="cpu")


def _committed_records_of(questions):
    """The committed records of ``questions`` (both files), in the order generation made them."""
    wanted = {q.question: k for k, q in enumerate(questions)}
    records = [r for split in PAIR_FILES for r in _records(split) if r["question"] in wanted]
    return sorted(records, key=lambda r: wanted[r["question"]])  # stable: keeps each question's pair order


def test_a_seeded_prefix_of_the_generation_reproduces_the_committed_records(sft_model):
    """Regenerating everything takes ~1 min on a 2-core CPU, so this test regenerates the first 64 questions (the
    first two sampling batches of 512 prompts: the seeded streams are consumed in question order, so these
    records do not depend on the questions after them) and compares them with the committed ones."""
    model, tokenizer = sft_model
    config = PreferenceDataConfig()
    questions = list(make_split(0).train_pool)[:64]
    records = make_preference_pairs(
        model, tokenizer, questions, samples_per_question=config.samples_per_question,
        temperature=config.temperature, labeller=config.labeller(), seed=config.seed,
        max_new_tokens=config.max_new_tokens, max_pairs_per_question=config.max_pairs_per_question)
    assert len(records) > 100
    assert records == _committed_records_of(questions)


@pytest.mark.slow
def test_full_regeneration_reproduces_the_committed_files(sft_model):
    """`rlmt-edu preference-data` from the committed SFT checkpoint gives the committed bytes (CPU)."""
    model, tokenizer = sft_model
    records = generate_preference_data(model, tokenizer, PreferenceDataConfig())
    for split in PAIR_FILES:
        assert to_jsonl(records[split]) == (DATA_DIR / PAIR_FILES[split]).read_text(encoding="utf-8"), split


def test_pairs_are_deterministic_in_the_seed(sft_model):
    model, tokenizer = sft_model
    questions = random.Random(0).sample(list(make_split(0).train_pool), 24)
    kwargs = dict(samples_per_question=4, temperature=1.5, labeller=Labeller(), batch_size=64)
    first = make_preference_pairs(model, tokenizer, questions, seed=3, **kwargs)
    assert first == make_preference_pairs(model, tokenizer, questions, seed=3, **kwargs)
    assert first != make_preference_pairs(model, tokenizer, questions, seed=4, **kwargs)
    assert all(r["response_i"] != r["response_j"] for r in first)
