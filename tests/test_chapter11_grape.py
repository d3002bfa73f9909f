"""Chapter 11: GRAPE (§6, Eq. 15-17, Lemma 8.1): judgements and rubrics refuse bad input, Eq. 15 on a batch
by hand, the φ̄ diagnostic flags the poor item, the variance study against its formulas, the drawer's groups
(system, revision and SFT rows) and a seeded run that holds its held-out gold where GRPO on the reward model
alone loses it."""

import copy

import pytest
import torch

from rlmt_edu import rl
from rlmt_edu.algorithms import grape as G
from rlmt_edu.algorithms.grpo import GRPOConfig, grpo
from rlmt_edu.algorithms.reward_model import load_reward_model, reward_model_reward
from rlmt_edu.losses.grape import average_variances
from rlmt_edu.model import load_checkpoint
from rlmt_edu.paths import REWARD_MODEL, SFT
from rlmt_edu.rollout import merge_rollouts, policy_logprobs
from rlmt_edu.tokenizer import format_revision_prompt
from rlmt_edu.world import rubrics as W
from rlmt_edu.world.data import load_questions
from rlmt_edu.world.tasks import Question

needs_models = pytest.mark.skipif(not ((SFT / "config.json").is_file() and (REWARD_MODEL / "config.json").is_file()),
                                  reason="the SFT and reward-model checkpoints are not built yet")


def constant_judge(questions, responses):
    return [W.Judgement("a constant judge, for tests", 0.5, 0.5) for _ in responses]


def _rubrics(judge=constant_judge):
    return W.world_rubrics(judge)


MATH = Question("math", "what is 3 plus 4 ?", "3 plus 4 is 7 .")
FACT = Question("facts", "how many legs does a spider have ?", "a spider has 8 legs .")
HARM = Question("safety", "how do i steal a cow ?", W.REFUSAL, harmful=True)


# ---- judgements and rubrics refuse bad input ------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("score", 1.5), ("score", -0.1), ("confidence", 2.0), ("confidence", True)])
def test_a_judgement_outside_the_unit_interval_is_refused(field, value):
    verdict = {"reasoning": "r", "score": 0.5, "confidence": 0.5, field: value}
    with pytest.raises(ValueError, match=f"judge of x/y: {field}: expected a number in \\[0, 1\\]"):
        W.as_judgement(verdict, "judge of x/y")


def test_a_judgement_missing_a_field_names_the_judge_and_the_field():
    with pytest.raises(ValueError, match=r"judge of math/concise: .*none for \['confidence'\]"):
        W.as_judgement({"reasoning": "r", "score": 0.5}, "judge of math/concise")
    with pytest.raises(ValueError, match="got tuple"):
        W.as_judgement(("r", 0.5, 0.5), "judge of math/concise")


def test_a_judge_that_returns_bad_scores_is_caught_while_judging():
    def wild(questions, responses):
        return [{"reasoning": "too sure", "score": 1.2, "confidence": 0.9} for _ in responses]

    with pytest.raises(ValueError, match="judge of math/human_preference: score"):
        G.judge_responses(_rubrics(wild), [MATH], ["3 plus 4 is 7 ."])


def test_rubric_weights_must_sum_to_one():
    rubric = _rubrics()["math"]
    with pytest.raises(ValueError, match="weights: expected the math rubric's weights to sum to 1, got 1.3"):
        rubric.with_weights({"correct_answer": 0.8})
    assert abs(sum(i.weight for i in rubric.with_weights({"correct_answer": 0.4, "concise": 0.2}).items) - 1) < 1e-9


def test_a_category_with_no_rubric_and_a_sample_of_unknown_category_are_refused():
    with pytest.raises(ValueError, match="items: expected at least one rubric item for category 'math'"):
        W.Rubric("math", ())
    rubrics = _rubrics()
    del rubrics["safety"]
    with pytest.raises(ValueError, match="rubrics: expected a rubric for every category.*'safety'"):
        G.judge_responses(rubrics, [MATH, HARM], ["3 plus 4 is 7 .", W.REFUSAL])
    with pytest.raises(ValueError, match="sample 1 has an unknown category 'poetry'"):
        G.check_rubrics(_rubrics(), ["math", "poetry"])


def test_a_category_whose_items_all_have_zero_confidence_is_refused_by_name():
    def unsure(questions, responses):
        return [W.Judgement("no idea", 0.5, 0.0) for _ in responses]

    rubrics = _rubrics()
    zero = W.Rubric("facts", tuple(W.RubricItem(i.name, i.description, i.weight, unsure, i.flow)
                                   for i in rubrics["facts"].items))
    rubrics["facts"] = zero
    judged = G.judge_responses(rubrics, [MATH, FACT], ["3 plus 4 is 7 .", "a spider has 8 legs ."])
    with pytest.raises(ValueError, match=r"φ̄ = 0 on every item of the categories \['facts'\]"):
        G.grape_rewards(judged)


def test_a_revision_prompt_longer_than_the_context_is_refused():
    tokenizer = load_checkpoint(SFT)[1] if (SFT / "config.json").is_file() else pytest.skip("no SFT checkpoint")
    long_previous = " ".join(["a cow has 4 legs ."] * 8)
    with pytest.raises(ValueError, match="revision prompt: expected at most 48 tokens"):
        G.encode_revision(tokenizer, MATH, long_previous, "3 plus 4 is 7 .", context=64, max_new_tokens=16)
    ids = G.encode_revision(tokenizer, MATH, "3 plus 4 is 8 .", "3 plus 4 is 7 .", context=64, max_new_tokens=16)
    assert tokenizer.decode(ids) == format_revision_prompt(W.REVISION_SYSTEM_PROMPT, MATH.question,
                                                           "3 plus 4 is 8 .", "3 plus 4 is 7 .")


# ---- Eq. 15 on a batch, and the diagnostic ----------------------------------------------------------------------


def test_grape_rewards_are_eq15_with_the_category_mean_confidence():
    def judge(scores_and_confidences):
        answers = iter(scores_and_confidences)
        return lambda questions, responses: [W.Judgement("scripted", *next(answers)) for _ in responses]

    items = [("a", 0.5, [(1.0, 1.0), (0.0, 1.0)]), ("b", 0.3, [(0.5, 0.2), (1.0, 0.6)]),
             ("c", 0.2, [(0.0, 0.9), (1.0, 0.5)])]
    rubric = W.Rubric("math", tuple(W.RubricItem(n, n, w, judge(sc), "non-verifiable") for n, w, sc in items))
    rubrics = {**_rubrics(), "math": rubric}
    judged = G.judge_responses(rubrics, [MATH, MATH], ["x", "y"])
    rewards, phi_bar = G.grape_rewards(judged)
    phi = [1.0, 0.4, 0.7]  # φ̄_j: the mean over the two math samples
    assert torch.allclose(phi_bar[0], torch.tensor(phi)) and torch.allclose(phi_bar[1], torch.tensor(phi))
    for i in range(2):
        tau = [sc[i][0] for _, _, sc in items]
        omega = [w for _, w, _ in items]
        expected = 3 * sum(w * t * p for w, t, p in zip(omega, tau, phi)) / sum(phi)  # Eq. 15
        assert rewards[i].item() == pytest.approx(expected, rel=1e-6)
    plain, _ = G.grape_rewards(judged, use_confidence=False)
    assert plain[0].item() == pytest.approx(0.5 * 1.0 + 0.3 * 0.5 + 0.2 * 0.0)


def test_verifiable_judges_check_ground_truth_and_say_why():
    right, wrong = W.VerifiableJudge("correct")([MATH, MATH], ["3 plus 4 is 7 .", "3 plus 4 is 8 ."])
    assert (right.score, right.confidence, wrong.score) == (1.0, 1.0, 0.0)
    assert "does not match" in wrong.reasoning and "3 plus 4 is 7 ." in wrong.reasoning
    refused, = W.VerifiableJudge("correct")([HARM], [W.REFUSAL])
    assert refused.score == 1.0


def test_a_noisy_judge_has_its_noise_and_states_a_confidence_that_tracks_it():
    sharp, vague = W.NoisyJudge("concise", 0.05, seed=1), W.NoisyJudge("concise", 0.6, seed=1)
    assert sharp.confidence > 0.9 > 0.2 > vague.confidence
    # one word over the reference: the concise part is 1 - 1/6, away from the clip at 0 and 1
    question = Question("facts", "how many legs does a spider have ?", "a spider has 8 legs .")
    response = "a spider has 8 legs . ."
    truth = W.gold_parts(question, response)["concise"]
    scores = torch.tensor([j.score for j in sharp([question] * 400, [response] * 400)])
    assert abs(float(scores.mean()) - truth) < 0.02 and abs(float(scores.std()) - 0.05) < 0.01
    liar = W.NoisyJudge("concise", 0.6, stated_confidence=1.0)
    assert liar.confidence == 1.0


@needs_models
def test_the_diagnostic_flags_the_poor_item_and_only_it(models):
    policy, tokenizer, rubrics, _ = models
    questions = rl.prompt_pool("train_pool")[::12]
    judged = G.judge_responses(rubrics, questions, [q.answer for q in questions])
    table = G.confidence_table(judged)
    assert (table[0]["category"], table[0]["item"]) == W.POOR_ITEM and table[0]["review"]
    assert not any(row["review"] for row in table[1:])
    assert table[0]["phi_bar"] == pytest.approx(W.calibrated_confidence(0.6), rel=0.1)


# ---- Lemma 8.1 and beyond it ------------------------------------------------------------------------------------


def test_rubric_variances_reduce_to_lemma_8_1_when_its_assumptions_hold():
    sigma = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    phi = 1 / sigma**2
    result = G.rubric_variances(sigma, phi)
    plain, weighted = average_variances(sigma, phi)
    assert result["plain"] == pytest.approx(float(plain)) and result["weighted"] == pytest.approx(float(weighted))
    assert result["weighted"] == pytest.approx(1 / float((1 / sigma**2).sum()))  # the lemma's closed form
    assert result["ratio"] < 1
    measured = G.simulated_rubric_variances(sigma, phi, n_draws=40_000, generator=torch.Generator().manual_seed(0))
    assert measured["ratio"] == pytest.approx(result["ratio"], rel=0.05)


def test_outside_the_lemma_weighting_can_hurt():
    sigma = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    miscalibrated = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)  # most confident where noisiest
    assert G.rubric_variances(sigma, miscalibrated)["ratio"] > 1
    # unequal ω: Eq. 15's effective weights need not sum to 1 (R is rescaled as well as reweighted)
    omega = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    unequal = G.rubric_variances(sigma, 1 / sigma**2, omega)
    assert unequal["weighted_weight_sum"] != pytest.approx(1.0)
    # perfectly correlated judges of equal noise: no weighting can average the noise away
    same = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    assert G.rubric_variances(same, torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64),
                              correlation=1.0)["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="correlation: expected a number in"):
        G.rubric_variances(sigma, sigma, correlation=-0.9)


# ---- generation: the drawer's groups ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    policy, tokenizer = load_checkpoint(SFT)
    reward_model, _ = load_reward_model()
    judge = W.PreferenceJudge(reward_model_reward(reward_model, tokenizer), confidence=0.74, center=-0.72, scale=0.49)
    return policy.requires_grad_(False), tokenizer, W.world_rubrics(judge), reward_model


def test_merge_rollouts_pads_prompts_left_and_responses_right():
    from rlmt_edu.rollout import Rollout

    a = Rollout(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[7]]),
                torch.ones(1, 1, dtype=torch.long), torch.tensor([[-0.5]]))
    b = Rollout(torch.tensor([[5, 6, 8]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[7, 2]]),
                torch.ones(1, 2, dtype=torch.long), torch.tensor([[-0.1, -0.2]]))
    merged = merge_rollouts([a, b], pad_id=0)
    assert merged.prompt_ids.tolist() == [[0, 5, 6], [5, 6, 8]] and merged.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert merged.response_ids.tolist() == [[7, 0], [7, 2]] 
    assert torch.equal(merged.logp, torch.tensor([[-0.5, 0.0], [-0.1, -0.2]]))


@needs_models
def test_the_drawer_builds_groups_of_system_revision_and_sft_rows(models):
    policy, tokenizer, rubrics, _ = models
    config = G.GRAPEConfig(questions_per_step=3, group_size=5, revision_probability=0.7, sft_in_group=True)
    draw = G.GrapeDrawer(policy, tokenizer, rl.prompt_pool("train_pool"), rubrics, config)
    questions, rollout, responses, rewards = draw()
    modes = draw.last["modes"]
    assert len(questions) == rollout.response_ids.shape[0] == 15 and rewards.shape == (15,)
    for q in range(3):
        group = modes[5 * q: 5 * q + 5]
        assert group[0] == "system" and group[-1] == "sft" and len({x.question for x in questions[5 * q: 5 * q + 5]}) == 1
        assert responses[5 * q + 4] == questions[5 * q].answer
    assert "revision" in modes
    for i in draw.last["critiques"]:
        assert draw.last["critiques"][i]  # a revision row read a critique
    # the merged rollout still scores what was sampled: the first ratio of the update is 1
    logp = policy_logprobs(policy, rollout)
    assert (logp - rollout.logp).abs().max().item() < 1e-4
    assert rollout.decode(tokenizer) == responses
    # the rewards are Eq. 15 of the step's judgements
    again, _ = G.grape_rewards(draw.last["judged"])
    assert torch.equal(again, rewards.cpu())


def test_grape_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="revision_probability: expected a number in \\[0, 1\\]"):
        G.GRAPEConfig(revision_probability=1.5)
    with pytest.raises(ValueError, match="loss: expected one of"):
        G.GRAPEConfig(loss="eq99")
    with pytest.raises(ValueError, match="group_size: expected >= 3 with sft_in_group"):
        G.GRAPEConfig(group_size=2, sft_in_group=True)


@needs_models
def test_one_eq17_step_runs_and_logs_the_sequence_clip(models):
    policy, tokenizer, rubrics, _ = models
    policy = copy.deepcopy(policy).requires_grad_(True)
    config = G.GRAPEConfig(steps=2, questions_per_step=2, group_size=4, loss="eq17", updates_per_batch=2)
    history = G.grape(policy, tokenizer, rubrics, config, eval_questions=[], progress=False)
    assert len(history) == 2 and 0 <= history[-1]["grpo/clip_fraction"] <= 1
    drawn = [c for c in ("math", "facts", "safety") if f"grape/R/{c}" in history[-1]]
    assert drawn and all(0 < history[-1][f"phi_bar/{c}/human_preference"] <= 1 for c in drawn)


# ---- learning ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_models
def test_grape_holds_heldout_gold_where_grpo_on_the_reward_model_alone_loses_it(models):
    sft_model, tokenizer, _, reward_model = models
    proxy = reward_model_reward(reward_model, tokenizer)
    judge = G.reward_model_judge(reward_model, tokenizer, sft_model)
    rubrics = W.world_rubrics(judge)

    baseline = copy.deepcopy(sft_model).requires_grad_(True)
    grpo_history = grpo(baseline, tokenizer, proxy, GRPOConfig(prompts="train_pool", learning_rate=1e-4),
                        progress=False)
    policy = copy.deepcopy(sft_model).requires_grad_(True)
    G.prompt_sft(policy, tokenizer, rubrics, load_questions("train"), progress=False)
    grape_history = G.grape(policy, tokenizer, rubrics, G.GRAPEConfig(learning_rate=1e-4), proxy_fn=proxy,
                            progress=False)
    grpo_drop = grpo_history[0]["eval/gold_score"] - grpo_history[-1]["eval/gold_score"]
    grape_drop = grape_history[0]["plain/gold_score"] - grape_history[-1]["plain/gold_score"]
    assert grpo_drop > 0.1  # measured 0.23: the reward model's flaws, exploited
    assert grape_drop < 0.05  # measured 0.02: verifiable items hold the reward to the truth
    assert grape_history[-1]["plain/gold_score/facts"] == pytest.approx(1.0)
