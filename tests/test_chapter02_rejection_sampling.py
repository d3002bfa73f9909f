"""Chapter 02: rejection sampling (§3) and the preference model trained with §3's binary cross entropy.

Learning tests start from the committed SFT checkpoint; helper tests use a tiny random GPT saved to a tmp folder.
"""

import dataclasses
import math
import random

import pytest
import torch

from rlmt_edu.algorithms.preference_model import (
    PreferenceModelConfig,
    build_preference_model,
    check_pairs,
    encode_preference_pairs,
    labelled_pairs_from_groups,
    preference_accuracy,
    preference_logits,
    preference_probabilities,
    train_preference_model,
)
from rlmt_edu.algorithms.rejection_sampling import (
    RejectionSamplingConfig,
    answer_entropy,
    distinct_responses,
    policy_token_entropy,
    rank_groups,
    rejection_sampling,
    sample_groups,
    select_top,
    select_top_indices,
)
from rlmt_edu.chapters import SFT
from rlmt_edu.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from rlmt_edu.world.data import load_questions
from rlmt_edu.world.preference import Labeller, gold_score
from rlmt_edu.world.tasks import Question, make_split
from rlmt_edu.world.vocab import world_tokenizer

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=64)
SPIDER = Question("facts", "how many legs does a spider have ?", "a spider has 8 legs .")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT, its tokenizer, and a checkpoint folder of it (for the preference model's trunk)."""
    tokenizer = world_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0)
    folder = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ch02") / "tiny")
    return model, tokenizer, folder


def _heldout_pairs_or_sampled(tokenizer, split: str, n: int) -> list[dict]:
    """The committed preference pairs if they exist, else pairs sampled from the SFT model and labelled here."""
    try:
        from rlmt_edu.algorithms.preference_data import load_preference_pairs

        records = load_preference_pairs(split)
        records = [r if isinstance(r, dict) else r.to_record() for r in records]
        return records if n >= len(records) else random.Random(0).sample(records, n)  # all: in file order
    except FileNotFoundError:
        model, _ = load_checkpoint(SFT)
        pool = [q for q in make_split(0).train_pool]
        questions = random.Random(0 if split == "train" else 1).sample(pool, n // 3)
        _, groups = sample_groups(model, tokenizer, questions, group_size=6, temperature=1.3,
                                  generator=torch.Generator().manual_seed(0))
        return labelled_pairs_from_groups(questions, groups, Labeller(), seed=0, pairs_per_question=3)[:n]


# ---- learning tests (the committed SFT checkpoint) -------------------------------------------------------------


def test_rejection_sampling_raises_the_gold_score_of_the_samples():
    model, tokenizer = load_checkpoint(SFT)
    config = RejectionSamplingConfig(rounds=2, prompts_per_round=48, group_size=6, sft_steps=15, seed=0)
    history = rejection_sampling(model, tokenizer, config, eval_questions=load_questions("eval")[:40], progress=False)
    first, last = history[0], history[-1]
    assert len(history) == config.rounds + 1
    # step 4's selection: the kept responses are better than the average sample ...
    assert first["winners/correct_share"] > first["samples/correct_share"] + 0.1
    assert first["winners/gold"] > first["samples/gold"]
    # ... and fine-tuning on them (step 5) moves the policy's own samples up
    assert last["samples/gold"] > first["samples/gold"] + 0.02
    assert last["samples/correct_share"] > first["samples/correct_share"]


def test_preference_model_bce_falls_and_beats_chance_on_heldout_pairs():
    tokenizer = world_tokenizer()
    train = _heldout_pairs_or_sampled(tokenizer, "train", 2427)
    heldout = _heldout_pairs_or_sampled(tokenizer, "heldout", 405)
    model = build_preference_model(SFT)
    config = PreferenceModelConfig(steps=160, batch_size=32, learning_rate=3e-4, head_learning_rate=3e-3,
                                   eval_every=160, seed=0)  # the notebook's run: about 25 s on 2 quiet cores
    history = train_preference_model(model, tokenizer, train, config, heldout=heldout, progress=False)
    losses = history.series("preference/bce")[1]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.03
    # a short run is a weak ranker (the notebook trains longer), but already above chance on unseen questions
    assert history.last("preference/heldout_accuracy_labels") > 0.56
    assert history.last("preference/heldout_accuracy_gold") > 0.56


# ---- the five steps' helpers -------------------------------------------------------------------------------------


def test_sample_groups_gives_g_responses_per_question_question_major(tiny):
    model, tokenizer, _ = tiny
    questions = list(make_split(0).train_pool)[:3]
    rollout, groups = sample_groups(model, tokenizer, questions, group_size=4, max_new_tokens=6,
                                    generator=torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [4, 4, 4]
    assert rollout.response_ids.shape[0] == 12
    assert rollout.decode(tokenizer)[4:8] == groups[1]


def test_rank_groups_gold_is_the_gold_score():
    groups = [["a spider has 8 legs .", "a spider has 6 legs .", "spider"]]
    scores = rank_groups([SPIDER], groups, "gold")
    assert scores == [[gold_score(SPIDER, r) for r in groups[0]]]
    assert scores[0][0] == pytest.approx(1.0)


def test_rank_groups_labeller_round_robin_counts_wins():
    sharp = Labeller(temperature=1e-3, length_bias=0.0, flip=0.0)  # always follows the gold score
    groups = [["a spider has 6 legs .", "a spider has 8 legs .", "spider", "a spider has 8 legs ."]]
    scores = rank_groups([SPIDER], groups, "labeller", labeller=sharp, rng=random.Random(0))[0]
    # 3 distinct responses -> 3 matches, 3 wins in all; the correct one wins both of its matches
    assert scores == [1.0, 2.0, 0.0, 2.0]


def test_rank_groups_preference_model_scores_are_summed_win_probabilities(tiny):
    _, tokenizer, folder = tiny
    pm = build_preference_model(folder)
    six, eight, bare = "a spider has 6 legs .", "a spider has 8 legs .", "spider"
    groups = [[six, eight, bare, eight]]  # a repeated response is one contestant, with one score
    scores = rank_groups([SPIDER], groups, "preference_model", preference_model=pm, tokenizer=tokenizer)[0]
    # the round robin over the distinct responses, in sorted order (six, eight, bare): P(first beats second)
    p = preference_probabilities(pm, tokenizer, [SPIDER.question] * 3, [six, six, eight], [eight, bare, bare])
    assert scores[0] == pytest.approx(p[0].item() + p[1].item(), abs=1e-5)  # six: its wins over eight and bare
    assert scores[1] == pytest.approx(1 - p[0].item() + p[2].item(), abs=1e-5)  # eight
    assert scores[2] == pytest.approx(2 - p[1].item() - p[2].item(), abs=1e-5)  # bare
    assert scores[3] == scores[1]
    with pytest.raises(ValueError, match="preference_model"):
        rank_groups([SPIDER], groups, "preference_model")


def test_rank_groups_rejects_bad_inputs():
    with pytest.raises(ValueError, match="ranker"):
        rank_groups([SPIDER], [["x", "y"]], "oracle")
    with pytest.raises(ValueError, match="groups"):
        rank_groups([SPIDER], [["x"], ["y"]], "gold")


def test_select_top_keeps_the_best_distinct_responses():
    groups = [["b", "a", "c", "a"], ["x", "y"]]
    scores = [[0.2, 0.9, 0.5, 0.9], [0.1, 0.3]]
    assert select_top(groups, scores) == [["a"], ["y"]]
    assert select_top(groups, scores, keep_top=2) == [["a", "c"], ["y", "x"]]


def test_select_top_breaks_ties_at_random_but_reproducibly():
    groups, scores = [["p", "q", "r"]], [[1.0, 1.0, 1.0]]
    picks = {select_top(groups, scores, rng=random.Random(seed))[0][0] for seed in range(20)}
    assert picks == {"p", "q", "r"}
    assert select_top(groups, scores, rng=random.Random(3)) == select_top(groups, scores, rng=random.Random(3))


def test_select_top_indices_marks_one_copy_of_the_kept_text():
    groups = [["b", "a", "c", "a"], ["x", "y", "y"]]
    scores = [[0.2, 0.9, 0.5, 0.9], [0.1, 0.3, 0.3]]
    # "a" is kept once, as its first copy (sample 1); sample 3 is the same text and is dropped
    assert select_top_indices(groups, scores) == [[1], [1]]
    assert select_top_indices(groups, scores, keep_top=2) == [[1, 2], [1, 0]]
    # the positions name exactly the texts select_top keeps, ties broken by the same draws of rng
    ties = [["p", "q", "p", "r"]], [[1.0, 1.0, 1.0, 1.0]]
    for seed in range(10):
        (picked,) = select_top_indices(*ties, rng=random.Random(seed))
        assert [ties[0][0][g] for g in picked] == select_top(*ties, rng=random.Random(seed))[0]
        assert picked[0] in (0, 1, 3)  # never the second copy of "p"


def test_select_top_indices_rejects_bad_inputs():
    with pytest.raises(ValueError, match="scores"):
        select_top_indices([["a", "b"]], [[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="scores"):
        select_top_indices([["a", "b"]], [[0.1]])
    with pytest.raises(ValueError, match="keep_top"):
        select_top_indices([["a", "b"]], [[0.1, 0.2]], keep_top=0)


def test_diversity_measures_by_hand():
    groups = [["a .", "a .", "b .", "c ."], ["z .", "z .", "z .", "z ."]]
    assert distinct_responses(groups) == pytest.approx((3 + 1) / 2)
    by_hand = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # first group; the second has entropy 0
    assert answer_entropy(groups) == pytest.approx(by_hand / 2)


def test_policy_token_entropy_matches_a_naive_loop(tiny):
    model, tokenizer, _ = tiny
    questions = list(make_split(0).train_pool)[:2]
    rollout, _ = sample_groups(model, tokenizer, questions, group_size=2, max_new_tokens=5,
                               generator=torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(rollout.response_ids.shape[0]):
            prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
            response = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
            for t in range(len(response)):
                logits = model(input_ids=torch.tensor([prompt + response[:t]])).logits[0, -1]
                p = torch.softmax(logits, dim=-1)
                total += float(-(p * torch.log(p)).sum())
                count += 1
    assert policy_token_entropy(model, rollout) == pytest.approx(total / count, rel=1e-4)


# ---- the preference model's input and probabilities ----------------------------------------------------------------


def test_encode_preference_pairs_lays_out_both_responses(tiny):
    _, tokenizer, _ = tiny
    batch = encode_preference_pairs(tokenizer, ["what is 3 plus 4 ?"], ["3 plus 4 is 7 ."], ["7"], max_length=64)
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.split() == ("<USER> what is 3 plus 4 ? <MODEL> 3 plus 4 is 7 . <EOS> "
                            "<USER> what is 3 plus 4 ? <MODEL> 7 <EOS>").split()


def test_encode_preference_pairs_cuts_long_responses_to_fit(tiny):
    _, tokenizer, _ = tiny
    long = " ".join(["cow"] * 40)
    # the prompt is 10 tokens, so 34 leaves 34 - 2·10 - 2 = 12 response tokens: the 6-token answer keeps all
    batch = encode_preference_pairs(tokenizer, [SPIDER.question], [long], ["a spider has 8 legs ."], max_length=34)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 34 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[-8:]).split() == "<MODEL> a spider has 8 legs . <EOS>".split()
    assert tokenizer.decode(ids[:17]).split()[-8:] == ["<MODEL>"] + ["cow"] * 6 + ["<EOS>"]  # the long one: the rest
    # with 32 (10 response tokens) both are longer than half, so each keeps its first 5: neither is dropped
    ids = encode_preference_pairs(tokenizer, [SPIDER.question], [long], ["a spider has 8 legs ."],
                                  max_length=32)["input_ids"][0].tolist()
    assert len(ids) == 32
    assert tokenizer.decode(ids).split()[-7:] == "<MODEL> a spider has 8 legs <EOS>".split()


def test_symmetric_preference_probabilities_sum_to_one(tiny):
    _, tokenizer, folder = tiny
    pm = build_preference_model(folder)
    q, a, b = [SPIDER.question] * 2, ["a spider has 8 legs .", "spider"], ["a spider has 6 legs .", "8"]
    p_ab = preference_probabilities(pm, tokenizer, q, a, b)
    p_ba = preference_probabilities(pm, tokenizer, q, b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-6)
    # one order alone is σ(z(i, j)) of that order's logits, and nothing makes it sum to one with its mirror
    one_order = preference_probabilities(pm, tokenizer, q, a, b, symmetric=False)
    mirror = preference_probabilities(pm, tokenizer, q, b, a, symmetric=False)
    z = preference_logits(pm, encode_preference_pairs(tokenizer, q, a, b, max_length=pm.config.n_positions))
    assert torch.allclose(one_order, torch.sigmoid(z), atol=1e-6)
    assert not torch.allclose(one_order + mirror, torch.ones(2), atol=1e-4)


def test_preference_accuracy_against_labels_and_gold(tiny):
    _, tokenizer, folder = tiny
    pm = build_preference_model(folder)
    pair = {"question": SPIDER.question, "response_i": "a spider has 8 legs .", "response_j": "spider",
            "hp": 1, "gold_i": 1.0, "gold_j": 0.3}
    flipped = {**pair, "response_i": pair["response_j"], "response_j": pair["response_i"], "hp": 0,
               "gold_i": 0.3, "gold_j": 1.0}
    # a third pair whose label goes AGAINST gold, and a fourth whose gold scores tie (left out of accuracy_gold)
    against = {**pair, "response_j": "a spider has 6 legs .", "hp": 0, "gold_j": 0.5}
    tie = {**pair, "response_j": "a spider has 8 legs . a spider has 8 legs .", "gold_j": 1.0}
    pairs = [pair, flipped, against, tie]
    metrics = preference_accuracy(pm, tokenizer, pairs)
    p_first = preference_probabilities(pm, tokenizer, [SPIDER.question] * 4, [x["response_i"] for x in pairs],
                                       [x["response_j"] for x in pairs])  # (4,)
    picks = (p_first > 0.5).tolist()
    assert metrics["accuracy_labels"] == pytest.approx(sum(k == bool(x["hp"]) for k, x in zip(picks, pairs)) / 4)
    gold_picks = [k == (x["gold_i"] > x["gold_j"]) for k, x in zip(picks[:3], pairs[:3])]
    assert metrics["accuracy_gold"] == pytest.approx(sum(gold_picks) / 3)


def test_labelled_pairs_from_groups_are_distinct_and_labelled():
    groups = [["a spider has 8 legs .", "a spider has 6 legs .", "spider", "spider"]]
    sharp = Labeller(temperature=1e-3, length_bias=0.0, flip=0.0)  # always follows the gold score
    pairs = labelled_pairs_from_groups([SPIDER], groups, sharp, seed=0, pairs_per_question=10)
    assert len(pairs) == 3  # three distinct responses make three pairs
    assert all(p["response_i"] != p["response_j"] for p in pairs)
    assert all(p["gold_i"] == gold_score(SPIDER, p["response_i"]) for p in pairs)
    assert all(p["gold_j"] == gold_score(SPIDER, p["response_j"]) for p in pairs)
    assert all(p["hp"] == int(p["gold_i"] > p["gold_j"]) for p in pairs)  # no two gold scores tie here
    check_pairs(pairs)


# ---- bad inputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("group_size", 1), ("group_size", 0), ("group_size", 2.5), ("rounds", 0), ("prompts_per_round", 0),
        ("temperature", 0.0), ("temperature", float("nan")), ("temperature", float("inf")), ("ranker", "oracle"),
        ("keep_top", 0), ("sft_steps", 0), ("batch_size", 0), ("learning_rate", -1e-4), ("max_new_tokens", 0),
        ("categories", ("poetry",)), ("categories", ()), ("seed", -1),
    ],
)
def test_rejection_sampling_config_rejects(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        RejectionSamplingConfig(**{field: value})


def test_rejection_sampling_config_names_g_and_rejects_keeping_everything():
    with pytest.raises(ValueError, match=r"group_size: expected G >= 2"):
        RejectionSamplingConfig(group_size=1)
    with pytest.raises(ValueError, match="keep_top"):
        RejectionSamplingConfig(group_size=4, keep_top=4)


def test_rejection_sampling_needs_a_preference_model_for_that_ranker(tiny):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="needs a trained preference model, got None"):  # before any sampling
        rejection_sampling(model, tokenizer, RejectionSamplingConfig(ranker="preference_model"), progress=False)
    with pytest.raises(ValueError, match="config"):
        rejection_sampling(model, tokenizer, {"rounds": 1}, progress=False)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 0), ("learning_rate", 0.0), ("eval_every", 0), ("warmup_steps", -1),
     ("both_orders", "yes"), ("weight_decay", -0.1), ("head_learning_rate", 0.0),
     ("head_learning_rate", float("inf"))],
)
def test_preference_model_config_rejects(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        PreferenceModelConfig(**{field: value})


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([], "non-empty"),
        ([{"question": "q ?", "response_i": "a", "response_j": "a", "hp": 1}], "two different responses"),
        ([{"question": "q ?", "response_i": "a", "response_j": "b", "hp": 2}], "hp"),
        ([{"question": "q ?", "response_i": "a", "hp": 1}], "response_j"),
    ],
)
def test_check_pairs_rejects(pairs, message):
    with pytest.raises(ValueError, match=message):
        check_pairs(pairs)


def test_short_run_is_deterministic(tiny):
    _, tokenizer, folder = tiny
    config = RejectionSamplingConfig(rounds=1, prompts_per_round=4, group_size=3, sft_steps=2, max_new_tokens=6)
    runs = []
    for _ in range(2):
        model, _ = load_checkpoint(folder)
        runs.append(rejection_sampling(model, tokenizer, config, eval_questions=[SPIDER], progress=False))
    assert runs[0] == runs[1]
    model, _ = load_checkpoint(folder)
    other = rejection_sampling(model, tokenizer, dataclasses.replace(config, seed=1), eval_questions=[SPIDER],
                               progress=False)
    assert other != runs[0]  # the seed matters
