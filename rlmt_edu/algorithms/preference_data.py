"""Human preference pairs (§3, §4.4): two responses to one prompt, and which one a (simulated) human picked.

§3 trains a preference model, and §4.4 a reward model, on records of the form (text_i, text_j, hp): two texts
made of the SAME prompt and two DIFFERENT responses, with hp = 1 if the human preferred text_i. This module
makes such records from the SFT model and the toy world's simulated labellers:

1. sample ``samples_per_question`` responses to every question from the model (``rollout.sample``, seeded);
2. keep the distinct ones and pair them up (every pair of different responses to the same question);
3. ask a ``Labeller`` for hp (noisy Bradley–Terry on the hidden gold score, with a bias for LONGER answers)
   and record both gold scores, so that every chapter can compare what the labels say with the truth.

``PreferencePair`` holds one record and validates it; ``preference_pairs_from`` is the loader that the
reward model and the preference model use, and it rejects pairs whose prompts differ or whose two responses
are the same text. ``rlmt-edu preference-data`` writes ``data/preference_pairs_{train,heldout}.jsonl`` from
the committed SFT checkpoint; ``tests/test_preference_data.py`` checks that it reproduces the committed bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlmt_edu.rollout import sample
from rlmt_edu.tokenizer import EOS, MODEL, USER, encode_prompt
from rlmt_edu.utils import atomic_write_text
from rlmt_edu.world.data import DATA_DIR, to_jsonl
from rlmt_edu.world.preference import Labeller, gold_score
from rlmt_edu.world.tasks import Question, make_split, normalize

#: ``load_preference_pairs`` split -> file name in ``data/``.
PAIR_FILES = {"train": "preference_pairs_train.jsonl", "heldout": "preference_pairs_heldout.jsonl"}
_QUESTION_FIELDS = ("category", "question", "answer", "harmful")


# ----------------------------------------------------------------------------------------------------------
# One pair, validated
# ----------------------------------------------------------------------------------------------------------


def check_pair_texts(prompt_i: str, response_i: str, prompt_j: str, response_j: str) -> None:
    """Raise ``ValueError`` unless (prompt_i, response_i) and (prompt_j, response_j) form a valid pair.

    A pair compares two responses to ONE prompt (§3), so the prompts must be equal, and the two responses must
    be different texts (comparing a text with itself teaches nothing and its hp is pure noise). Texts are
    compared in the world's normal form (lower case, punctuation split off), i.e. as the tokenizer sees them.
    """
    for name, value in (("prompt_i", prompt_i), ("response_i", response_i), ("prompt_j", prompt_j),
                        ("response_j", response_j)):
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    if normalize(prompt_i) != normalize(prompt_j):
        raise ValueError(
            f"prompt_j: a pair needs two responses to the same prompt, got prompt_i={prompt_i!r:.80} "
            f"and prompt_j={prompt_j!r:.80}"
        )
    if normalize(response_i) == normalize(response_j):
        raise ValueError(
            f"response_j: a pair needs two different responses, got the same text twice: {response_i!r:.80}"
        )


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: a question, two different responses, and hp (§3)."""

    question: Question  #: the prompt both responses answer
    response_i: str  #: the first response (text, no special tokens)
    response_j: str  #: the second response, different from the first
    hp: int  #: 1 if the labeller preferred response_i, 0 if response_j
    gold_i: float | None = None  #: the hidden gold score of response_i in [0, 1] (None if unknown)
    gold_j: float | None = None  #: the hidden gold score of response_j in [0, 1] (None if unknown)

    def __post_init__(self) -> None:
        if not isinstance(self.question, Question):
            raise ValueError(f"question: expected a rlmt_edu.world.tasks.Question, got {type(self.question).__name__}")
        check_pair_texts(self.question.question, self.response_i, self.question.question, self.response_j)
        if isinstance(self.hp, bool) or self.hp not in (0, 1):
            raise ValueError(f"hp: expected 0 or 1, got {self.hp!r}")
        for name in ("gold_i", "gold_j"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: expected a number in [0, 1] or None, got {value!r}")

    @property
    def chosen(self) -> str:
        """The preferred response (text_w of Eq. 6)."""
        return self.response_i if self.hp == 1 else self.response_j

    @property
    def rejected(self) -> str:
        """The other response (text_l of Eq. 6)."""
        return self.response_j if self.hp == 1 else self.response_i

    @property
    def gold_preference(self) -> int | None:
        """1 if response_i has the higher gold score, 0 if response_j, None on a tie or without gold scores."""
        if self.gold_i is None or self.gold_j is None or abs(self.gold_i - self.gold_j) < 1e-9:
            return None
        return int(self.gold_i > self.gold_j)

    def to_record(self) -> dict:
        """The JSON record of ``data/preference_pairs_*.jsonl`` (question fields, responses, hp, gold, chosen)."""
        return {**self.question.to_record(), "response_i": self.response_i, "response_j": self.response_j,
                "hp": self.hp, "gold_i": self.gold_i, "gold_j": self.gold_j,
                "chosen": self.chosen, "rejected": self.rejected}

    @classmethod
    def from_record(cls, record: dict) -> "PreferencePair":
        """Inverse of ``to_record``; ``chosen``/``rejected``, when present, must agree with hp."""
        if not isinstance(record, dict):
            raise ValueError(f"record: expected a dict, got {type(record).__name__}")
        missing = [k for k in (*_QUESTION_FIELDS, "response_i", "response_j", "hp") if k not in record]
        if missing:
            raise ValueError(f"record: missing fields {missing} in {record!r:.200}")
        pair = cls(Question.from_record(record), record["response_i"], record["response_j"], record["hp"],
                   record.get("gold_i"), record.get("gold_j"))
        for name in ("chosen", "rejected"):
            if name in record and record[name] != getattr(pair, name):
                raise ValueError(f"record: {name}={record[name]!r:.60} disagrees with hp={pair.hp} and the responses")
        return pair


def split_chat_text(text: str, argument: str = "text") -> tuple[str, str]:
    """``"<USER> q <MODEL> r <EOS>"`` -> (``"<USER> q <MODEL>"``, ``"r"``); the trailing <EOS> is optional."""
    if not isinstance(text, str):
        raise ValueError(f"{argument}: expected a chat text '{USER} question {MODEL} response', got {type(text).__name__}")
    head, marker, response = text.strip().partition(MODEL)
    if not marker or not head.strip().startswith(USER):
        raise ValueError(f"{argument}: expected a chat text '{USER} question {MODEL} response', got {text!r:.80}")
    response = response.strip()
    if response.endswith(EOS):
        response = response[: -len(EOS)].strip()
    return f"{head.strip()} {MODEL}", response


def preference_pairs_from(pairs: Sequence, argument: str = "pairs") -> list[tuple[str, str, str]]:
    """The reward-model data loader's view of ``pairs``: a list of (question, chosen, rejected) strings.

    Each item may be a ``PreferencePair``, a record dict (as in ``data/preference_pairs_*.jsonl``), or a tuple
    ``(text_chosen, text_rejected)`` of full chat texts ``"<USER> q <MODEL> response <EOS>"``. Every item is
    validated: a tuple whose two texts have different prompts, or any pair whose two responses are the same
    text, raises ``ValueError`` naming the item (``pairs[3]: ...``).
    """
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"{argument}: expected a non-empty list of pairs, got {type(pairs).__name__} {pairs!r:.60}")
    out = []
    for index, item in enumerate(pairs):
        try:
            if isinstance(item, PreferencePair):
                pair = item
            elif isinstance(item, dict):
                pair = PreferencePair.from_record(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                prompt_w, chosen = split_chat_text(item[0], "text_chosen")
                prompt_l, rejected = split_chat_text(item[1], "text_rejected")
                check_pair_texts(prompt_w, chosen, prompt_l, rejected)
                question = prompt_w[len(USER): -len(MODEL)].strip()
                out.append((question, chosen, rejected))
                continue
            else:
                raise ValueError(
                    f"expected a PreferencePair, a record dict or a (text_chosen, text_rejected) tuple, "
                    f"got {type(item).__name__}"
                )
        except ValueError as error:
            raise ValueError(f"{argument}[{index}]: {error}") from None
        out.append((pair.question.question, pair.chosen, pair.rejected))
    return out


# ----------------------------------------------------------------------------------------------------------
# Making pairs from the SFT model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def make_preference_pairs(
    model,
    tokenizer,
    questions: Sequence[Question],
    *,
    samples_per_question: int,
    temperature: float,
    labeller: Labeller,
    seed: int,
    max_new_tokens: int = 24,
    max_pairs_per_question: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> list[dict]:
    """Sample responses, pair up the distinct ones per question, and label each pair (§3).

    For each question (in order) the model answers ``samples_per_question`` times at ``temperature``; the
    draws come from a ``torch.Generator`` seeded with ``seed`` and the labeller's coin flips from
    ``random.Random(seed)``, so the same model and arguments give the same records. Distinct responses (in the
    world's normal form; first occurrence kept) are paired in sampling order, (r_1, r_2), (r_1, r_3), ...;
    ``max_pairs_per_question`` keeps a seeded random subset of them. Each pair is labelled once:
    ``hp = labeller.label(question, response_i, response_j)``; gold scores are rounded to 6 decimals.

    Returns one record per pair (see ``PreferencePair.to_record``). A question whose samples are all the same
    text gives no pair. Prompts are sampled ``batch_size`` rows at a time, in question order, so the records of
    the first k·batch_size/samples_per_question questions do not depend on the questions after them.
    """
    if isinstance(questions, Question) or not isinstance(questions, Sequence) or len(questions) == 0:
        raise ValueError(f"questions: expected a non-empty list of Question, got {questions!r:.60}")
    bad = [q for q in questions if not isinstance(q, Question)]
    if bad:
        raise ValueError(f"questions: expected only Question objects, got {type(bad[0]).__name__}")
    for name, value, low in (("samples_per_question", samples_per_question, 2), ("seed", seed, 0),
                             ("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if max_pairs_per_question is not None and (not isinstance(max_pairs_per_question, int)
                                               or isinstance(max_pairs_per_question, bool)
                                               or max_pairs_per_question < 1):
        raise ValueError(f"max_pairs_per_question: expected None or an int >= 1, got {max_pairs_per_question!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not isinstance(labeller, Labeller):
        raise ValueError(f"labeller: expected a rlmt_edu.world.preference.Labeller, got {type(labeller).__name__}")

    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    # every question's prompt, repeated samples_per_question times in a row
    prompts = [encode_prompt(tokenizer, q.question) for q in questions for _ in range(samples_per_question)]
    responses: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        rollout = sample(model, prompts[start: start + batch_size], max_new_tokens=max_new_tokens,
                         temperature=temperature, generator=generator, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id)
        responses += [normalize(text) for text in rollout.decode(tokenizer)]

    rng = random.Random(seed)
    records = []
    for index, question in enumerate(questions):
        group = responses[index * samples_per_question: (index + 1) * samples_per_question]
        distinct = list(dict.fromkeys(group))  # first occurrence kept, sampling order preserved
        pairs = [(a, b) for n, a in enumerate(distinct) for b in distinct[n + 1:]]
        if max_pairs_per_question is not None and len(pairs) > max_pairs_per_question:
            keep = sorted(rng.sample(range(len(pairs)), max_pairs_per_question))
            pairs = [pairs[k] for k in keep]
        for response_i, response_j in pairs:
            hp = labeller.label(question, response_i, response_j, rng)
            pair = PreferencePair(question, response_i, response_j, hp,
                                  round(gold_score(question, response_i), 6), round(gold_score(question, response_j), 6))
            records.append(pair.to_record())
    return records


@dataclass(frozen=True)
class PreferenceDataConfig:
    """How ``data/preference_pairs_*.jsonl`` are made (defaults: the committed files, ~30 s on a 2-core CPU)."""

    seed: int = 0  #: seeds the question split, the sampling and the labeller
    samples_per_question: int = 16  #: responses sampled per question (the SFT model often repeats itself)
    temperature: float = 1.1  #: sampling temperature (>= 1: varied responses, lengths included)
    max_new_tokens: int = 24  #: longest response; a response cut here has no <EOS> (too long)
    max_pairs_per_question: int = 8  #: at most this many pairs per question (a seeded random subset)
    heldout_fraction: float = 0.15  #: share of the train-pool QUESTIONS whose pairs go to the held-out file
    labeller_temperature: float = 0.1  #: ``Labeller.temperature``: gold-score gap worth one logit
    labeller_length_bias: float = 0.4  #: ``Labeller.length_bias``: logits per extra word (§3's flaw)
    labeller_flip: float = 0.05  #: ``Labeller.flip``: half the rate of careless random clicks

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {self.heldout_fraction!r}")
        if not self.temperature >= 1.0:
            raise ValueError(f"temperature: expected >= 1 so that responses vary (in length too), got {self.temperature!r}")
        self.labeller()  # validates the labeller's fields

    def labeller(self) -> Labeller:
        return Labeller(temperature=self.labeller_temperature, length_bias=self.labeller_length_bias,
                        flip=self.labeller_flip)


def split_questions(questions: Sequence[Question], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Split questions (not pairs) into train and held-out, seeded, so that no question is on both sides."""
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(heldout_fraction * len(questions)))
    heldout = set(order[:n_heldout])
    return ([q for k, q in enumerate(questions) if k not in heldout],
            [q for k, q in enumerate(questions) if k in heldout])


def generate_preference_data(model, tokenizer, config: PreferenceDataConfig = PreferenceDataConfig(),
                             *, questions: Sequence[Question] | None = None,
                             progress: bool = False) -> dict[str, list[dict]]:
    """The records of both files, ``{"train": [...], "heldout": [...]}``, split by question.

    ``questions`` defaults to the world's train pool (``make_split(0).train_pool``: never the evaluation set).
    Pairs are generated for all questions in one seeded pass, then divided by which side their question is on.
    """
    if not isinstance(config, PreferenceDataConfig):
        raise ValueError(f"config: expected a PreferenceDataConfig, got {type(config).__name__}")
    questions = list(make_split(0).train_pool if questions is None else questions)
    train_qs, heldout_qs = split_questions(questions, config.heldout_fraction, config.seed)
    records = make_preference_pairs(model, tokenizer, questions, samples_per_question=config.samples_per_question,
                                    temperature=config.temperature, labeller=config.labeller(), seed=config.seed,
                                    max_new_tokens=config.max_new_tokens,
                                    max_pairs_per_question=config.max_pairs_per_question, progress=progress)
    heldout_texts = {q.question for q in heldout_qs}
    return {"train": [r for r in records if r["question"] not in heldout_texts],
            "heldout": [r for r in records if r["question"] in heldout_texts]}


def write_preference_data(records: dict[str, list[dict]], out_dir: str | Path = DATA_DIR) -> list[Path]:
    """Write ``{"train": ..., "heldout": ...}`` to ``out_dir``, each file atomically (temp file + rename)."""
    out = Path(out_dir)
    paths = []
    umask = os.umask(0)
    os.umask(umask)
    for split, filename in PAIR_FILES.items():
        atomic_write_text(out / filename, to_jsonl(records[split]))
        os.chmod(out / filename, 0o666 & ~umask)  # a normal file's mode, not mkstemp's private 0600
        paths.append(out / filename)
    return paths


def load_preference_pairs(split: str, data_dir: str | Path | None = None) -> list[PreferencePair]:
    """The committed pairs, ``split`` = "train" or "heldout", each validated as a ``PreferencePair``."""
    if split not in PAIR_FILES:
        raise ValueError(f"split: expected one of {tuple(PAIR_FILES)}, got {split!r}")
    path = Path(DATA_DIR if data_dir is None else data_dir) / PAIR_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create it with `rlmt-edu preference-data`")
    import json

    with path.open(encoding="utf-8") as handle:
        return [PreferencePair.from_record(json.loads(line)) for line in handle if line.strip()]


def length_spread(records: Sequence[dict]) -> dict[str, float]:
    """How much the paired responses differ in length (words): what lets the labellers' length bias matter."""
    import numpy as np

    lengths = np.array([len(r[k].split()) for r in records for k in ("response_i", "response_j")])
    gaps = np.array([abs(len(r["response_i"].split()) - len(r["response_j"].split())) for r in records])
    return {
        "pairs": len(records),
        "words/mean": float(lengths.mean()), "words/std": float(lengths.std()),
        "words/min": int(lengths.min()), "words/max": int(lengths.max()),
        "gap/mean": float(gaps.mean()), "gap/share_nonzero": float((gaps > 0).mean()),
        "gap/share_ge3": float((gaps >= 3).mean()),
    }


def config_dict(config: PreferenceDataConfig) -> dict:
    return dataclasses.asdict(config)
