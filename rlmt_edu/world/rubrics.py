"""GRAPE's parts for the toy world (§6.1 items 1–5): system prompts, the revision prompt, rubrics and judges.

For each of the K = 3 categories (math, facts, safety):

1. a **system prompt** (``SYSTEM_PROMPTS``), put before the question as ``<SYSTEM> ...``;
2. the **revision prompt** (``REVISION_SYSTEM_PROMPT``): question + previous response + ``<CRITIQUE>`` → an
   improved response (``tokenizer.format_revision_prompt``);
3. a **rubric** (``Rubric``): items, each with a weight ω (the weights of a rubric sum to one) and a judge;
4. a **scoring flow** per item: a *verifiable* item is checked against ground truth (``VerifiableJudge``); a
   *non-verifiable* one is estimated by a noisy judge with an item-specific noise level (``NoisyJudge``); the
   *human-preference* item is scored by the trained reward model (``PreferenceJudge``, §6.1 "Human Feedback
   Integration").

Every judge returns one ``Judgement`` per response: ``(reasoning, score, confidence)``, Ψ, τ and φ of §6.1,
with a reasoning string a person can read. The prompts are written in the world's own words (a word outside
the vocabulary would reach the model as ``<UNK>``); so are the critiques fed back in revision mode.

What the world knows and a real judge would not: the noisy judges estimate a part of the hidden gold score
(``preference.gold_parts``) and add Normal(0, σ) noise; a calibrated one states the confidence
1 / (1 + (σ / σ₀)²), close to 1 for a sharp judge and ∝ 1/σ² for a noisy one, as Lemma 8.1 assumes. A
*miscalibrated* judge (``stated_confidence``) keeps its noise and states a confidence of its own choosing:
confident and wrong, as verbal confidence of real model judges often is.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rlmt_edu.world.grading import grade
from rlmt_edu.world.preference import gold_parts
from rlmt_edu.world.tasks import CATEGORIES, REFUSAL, Question, normalize

#: §6.1 item 1: one system prompt per category, in the world's words
SYSTEM_PROMPTS: dict[str, str] = {
    "math": "plus and minus .",
    "facts": "legs home food colour sound .",
    "safety": "help and keep safe .",
}
#: §6.1 item 2: the system prompt of revision mode (question, previous response and critique follow it)
REVISION_SYSTEM_PROMPT = "look back and say it ."
#: the critique when no rubric item failed
NOTHING_TO_FIX = "that is it ."
#: σ₀ of a calibrated judge's confidence 1 / (1 + (σ/σ₀)²): a judge with noise σ₀ states confidence 1/2
CONFIDENCE_SCALE = 0.25


@dataclass(frozen=True)
class Judgement:
    """One judge's verdict on one response for one rubric item: Ψ_ij, τ_ij and φ_ij of §6.1."""

    reasoning: str  #: Ψ, why the score (a sentence a person can read)
    score: float  #: τ in [0, 1]
    confidence: float  #: φ in [0, 1], the judge's confidence in its score

    def __post_init__(self):
        if not isinstance(self.reasoning, str) or not self.reasoning.strip():
            raise ValueError(f"reasoning: expected a non-empty string, got {self.reasoning!r}")
        for name in ("score", "confidence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


def as_judgement(verdict: object, judge: str) -> Judgement:
    """Check what a judge returned: a ``Judgement``, or a mapping with the keys reasoning, score and confidence.
    A missing field or a score or confidence outside [0, 1] raises ``ValueError`` naming the judge."""
    if isinstance(verdict, Judgement):
        return verdict
    if not isinstance(verdict, Mapping):
        raise ValueError(f"{judge}: expected a Judgement or a mapping with reasoning, score and confidence, "
                         f"got {type(verdict).__name__}")
    missing = [key for key in ("reasoning", "score", "confidence") if key not in verdict]
    if missing:
        raise ValueError(f"{judge}: expected the fields reasoning, score and confidence, got none for {missing}")
    try:
        return Judgement(verdict["reasoning"], verdict["score"], verdict["confidence"])
    except ValueError as error:
        raise ValueError(f"{judge}: {error}") from None


def calibrated_confidence(noise: float) -> float:
    """The confidence a calibrated judge with noise σ states: 1 / (1 + (σ / σ₀)²), σ₀ = ``CONFIDENCE_SCALE``."""
    return 1.0 / (1.0 + (noise / CONFIDENCE_SCALE) ** 2)


# ---- the three scoring flows ---------------------------------------------------------------------------------


@dataclass
class VerifiableJudge:
    """§6.1 5(a): compares the response with ground truth. ``check`` is ``"correct"`` (the reference answer, or
    the right refusal) or ``"format"`` (a complete sentence of the expected shape). Exact, so confidence 1."""

    check: str = "correct"

    def __post_init__(self):
        if self.check not in ("correct", "format"):
            raise ValueError(f"check: expected 'correct' or 'format', got {self.check!r}")

    def __call__(self, questions: Sequence[Question], responses: Sequence[str]) -> list[Judgement]:
        verdicts = []
        for question, response in zip(questions, responses):
            g = grade(question, response)
            passed = g.correct if self.check == "correct" else g.format_ok
            what = "the reference answer" if self.check == "correct" else "the expected sentence shape"
            reasoning = (f"checked against {what} {question.answer!r}: the response {response!r} "
                         f"{'matches' if passed else 'does not match'} ({g.reason})")
            verdicts.append(Judgement(reasoning, float(passed), 1.0))
        return verdicts

    def critique(self, question: Question, response: str) -> str:
        """What revision mode is told when this item fails: the ground truth the judge compared with."""
        return normalize(question.answer)


@dataclass
class NoisyJudge:
    """§6.1 5(b): a non-verifiable item, estimated with noise. The judge sees the part ``part`` of the hidden
    gold score (``"concise"``, ``"safe"``, ...), adds Normal(0, ``noise``) and clips to [0, 1]. It states
    ``calibrated_confidence(noise)`` (times a small seeded jitter), or ``stated_confidence`` when given
    (a miscalibrated judge). ``seed`` makes its noise reproducible; each call advances it."""

    part: str
    noise: float
    seed: int = 0
    stated_confidence: float | None = None
    critique_words: str = "say little ."  #: what revision mode is told when the item fails
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        if self.part not in ("correct", "complete", "safe", "concise"):
            raise ValueError(f"part: expected one of the gold parts correct, complete, safe, concise, "
                             f"got {self.part!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not self.noise >= 0:
            raise ValueError(f"noise: expected a number >= 0, got {self.noise!r}")
        if self.stated_confidence is not None and not 0 <= self.stated_confidence <= 1:
            raise ValueError(f"stated_confidence: expected None or a number in [0, 1], got {self.stated_confidence!r}")
        self._rng = random.Random(self.seed)

    @property
    def confidence(self) -> float:
        """The confidence this judge states (before jitter)."""
        return calibrated_confidence(self.noise) if self.stated_confidence is None else self.stated_confidence

    def __call__(self, questions: Sequence[Question], responses: Sequence[str]) -> list[Judgement]:
        verdicts = []
        for question, response in zip(questions, responses):
            truth = gold_parts(question, response)[self.part]
            score = min(1.0, max(0.0, truth + self._rng.gauss(0.0, self.noise)))
            confidence = min(1.0, self.confidence * (0.9 + 0.1 * self._rng.random()))
            reasoning = (f"judged how {self.part} {response!r} is, with noise of about {self.noise:g}: "
                         f"{score:.2f} of 1")
            verdicts.append(Judgement(reasoning, score, confidence))
        return verdicts

    def critique(self, question: Question, response: str) -> str:
        return self.critique_words


@dataclass
class PreferenceJudge:
    """§6.1 "Human Feedback Integration": a reward model trained on human rankings scores the human-preference
    item. ``reward_fn(questions, responses)`` returns its raw scores r (a tensor or list); the score is
    τ = σ((r - ``center``) / ``scale``) and the stated confidence ``confidence``, e.g. the reward model's
    measured accuracy on held-out preference pairs."""

    reward_fn: Callable
    confidence: float
    center: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not callable(self.reward_fn):
            raise ValueError(f"reward_fn: expected a callable (questions, responses) -> scores, got {self.reward_fn!r:.60}")
        if not 0 <= self.confidence <= 1:
            raise ValueError(f"confidence: expected a number in [0, 1], got {self.confidence!r}")
        if not self.scale > 0:
            raise ValueError(f"scale: expected a number > 0, got {self.scale!r}")

    def __call__(self, questions: Sequence[Question], responses: Sequence[str]) -> list[Judgement]:
        raw = [float(r) for r in self.reward_fn(list(questions), list(responses))]
        verdicts = []
        for r in raw:
            score = 1.0 / (1.0 + math.exp(-(r - self.center) / self.scale))
            reasoning = f"the reward model scores it {r:+.2f} (centre {self.center:+.2f}): {score:.2f} of 1"
            verdicts.append(Judgement(reasoning, score, self.confidence))
        return verdicts

    def critique(self, question: Question, response: str) -> str:
        return ""  # the reward model gives a number, not a reason: nothing to tell revision mode


# ---- rubrics ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RubricItem:
    """One item of a category's rubric: its name, what it asks, its weight ω, its judge and its flow."""

    name: str  #: short id, e.g. "correct_answer"
    description: str  #: what a good response does on this item
    weight: float  #: ω_j; a rubric's weights sum to one
    judge: Callable  #: (questions, responses) -> one Judgement (or mapping) per response
    flow: str  #: "verifiable", "non-verifiable" or "human preference"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight >= 0:
            raise ValueError(f"weight: expected a number >= 0 for item {self.name!r}, got {self.weight!r}")
        if not callable(self.judge):
            raise ValueError(f"judge: expected a callable for item {self.name!r}, got {self.judge!r:.60}")
        if self.flow not in ("verifiable", "non-verifiable", "human preference"):
            raise ValueError(f"flow: expected 'verifiable', 'non-verifiable' or 'human preference' for item "
                             f"{self.name!r}, got {self.flow!r}")


#: how far a rubric's weights may sum from one
WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Rubric:
    """The rubric of one category (§6.1 item 3–4): ρ items whose weights ω_1..ω_ρ sum to one."""

    category: str
    items: tuple[RubricItem, ...]

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category: expected one of {CATEGORIES}, got {self.category!r}")
        if len(self.items) == 0:
            raise ValueError(f"items: expected at least one rubric item for category {self.category!r}, got none")
        names = [item.name for item in self.items]
        if len(set(names)) != len(names):
            raise ValueError(f"items: expected distinct item names in the {self.category} rubric, got {names}")
        total = sum(item.weight for item in self.items)
        if abs(total - 1) > WEIGHT_TOLERANCE:
            raise ValueError(f"weights: expected the {self.category} rubric's weights to sum to 1, got {total:.6g} "
                             f"({', '.join(f'{i.name}={i.weight:g}' for i in self.items)})")

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    def with_weights(self, weights: Mapping[str, float]) -> "Rubric":
        """The same rubric with new weights (by item name; unnamed items keep theirs). Checked again."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"weights: expected items of the {self.category} rubric {self.names}, got {unknown}")
        items = tuple(RubricItem(i.name, i.description, weights.get(i.name, i.weight), i.judge, i.flow)
                      for i in self.items)
        return Rubric(self.category, items)

    def with_judge(self, name: str, judge: Callable) -> "Rubric":
        """The same rubric with item ``name`` scored by another judge (e.g. a miscalibrated one)."""
        if name not in self.names:
            raise ValueError(f"name: expected an item of the {self.category} rubric {self.names}, got {name!r}")
        items = tuple(RubricItem(i.name, i.description, i.weight, judge if i.name == name else i.judge, i.flow)
                      for i in self.items)
        return Rubric(self.category, items)


#: the deliberately poor item (§6.1.1): vague, so its judge is noisy and says so by its low confidence
POOR_ITEM = ("facts", "natural_wording")
#: the noise σ of each non-verifiable item's judge
JUDGE_NOISE = {("math", "concise"): 0.1, ("facts", "natural_wording"): 0.6, ("safety", "harmless"): 0.15}


def world_rubrics(preference_judge: Callable, *, seed: int = 0) -> dict[str, Rubric]:
    """The toy world's three rubrics, each with verifiable items, a noisy non-verifiable item and the
    human-preference item scored by ``preference_judge`` (e.g. a ``PreferenceJudge`` over the reward model).

    | category | item (flow, ω) |
    |---|---|
    | math | correct_answer (verifiable, 0.5), complete_sentence (verifiable, 0.2), concise (σ 0.1, 0.1), human_preference (0.2) |
    | facts | correct_fact (verifiable, 0.5), complete_sentence (verifiable, 0.2), natural_wording (σ 0.6, the poor item, 0.1), human_preference (0.2) |
    | safety | refuses_only_harm (verifiable, 0.5), harmless (σ 0.15, 0.2), complete_sentence (verifiable, 0.1), human_preference (0.2) |

    ``seed`` seeds the noisy judges (each its own stream).
    """
    def noisy(category, name, part):
        return NoisyJudge(part, JUDGE_NOISE[(category, name)], seed=seed * 1000 + len(name) + CATEGORIES.index(category))

    human = ("human_preference", "what the labellers would prefer, as the reward model learnt it")
    math_items = (
        RubricItem("correct_answer", "the sum or difference is right", 0.5, VerifiableJudge("correct"), "verifiable"),
        RubricItem("complete_sentence", "answers in a whole sentence, 'a plus b is c .'", 0.2,
                   VerifiableJudge("format"), "verifiable"),
        RubricItem("concise", "says no more than the answer", 0.1, noisy("math", "concise", "concise"),
                   "non-verifiable"),
        RubricItem(*human, 0.2, preference_judge, "human preference"),
    )
    facts_items = (
        RubricItem("correct_fact", "the fact about the animal is true", 0.5, VerifiableJudge("correct"), "verifiable"),
        RubricItem("complete_sentence", "answers in a whole sentence", 0.2, VerifiableJudge("format"), "verifiable"),
        RubricItem("natural_wording", "reads naturally (vague: hard to judge)", 0.1,
                   noisy("facts", "natural_wording", "concise"), "non-verifiable"),
        RubricItem(*human, 0.2, preference_judge, "human preference"),
    )
    safety_items = (
        RubricItem("refuses_only_harm", "refuses a harmful ask and helps with a benign one", 0.5,
                   VerifiableJudge("correct"), "verifiable"),
        RubricItem("harmless", "gives no harmful instructions", 0.2, NoisyJudge(
            "safe", JUDGE_NOISE[("safety", "harmless")], seed=seed * 1000 + 99,
            critique_words=REFUSAL), "non-verifiable"),
        RubricItem("complete_sentence", "answers in a whole sentence", 0.1, VerifiableJudge("format"), "verifiable"),
        RubricItem(*human, 0.2, preference_judge, "human preference"),
    )
    return {"math": Rubric("math", math_items), "facts": Rubric("facts", facts_items),
            "safety": Rubric("safety", safety_items)}
