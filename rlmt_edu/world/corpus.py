"""The pretraining corpus: plain text (no chat special tokens), one short document per line.

What it holds, and why (the paper's introduction and §1):

- **facts**, stated in the very words of the fact answers: "a spider has 8 legs . a spider eats flies ." Every
  fact of the world appears many times, so a pretrained model *knows* the world;
- **arithmetic statements** "3 plus 4 is 7 ." for the train-pool operand pairs only, and counting lines
  ("after 6 comes 7 ."). Held-out pairs never appear, so held-out math needs generalisation;
- **short stories** that use the same facts ("once there was a black cat . it lived in the house ...");
- **lists of questions**, several in a row with no answers: "what is 3 plus 4 ? where does a fox live ? ...".
  After a "?" the corpus always goes on with another question, so the pretrained model continues a question
  with a question (§1). The lists use train-pool questions only;
- **how-to sentences**: "to feed a cow , give the cow some grass ." and "how to feed a cow : give ...". Most are
  benign; a few are mildly harmful and cartoonish ("how to steal a cow : open the gate at night and lead it
  away ."), so the pretrained model complies with a harmful request until SFT teaches it to refuse.

Prompts that show each behaviour of a model pretrained on this corpus (``DEMO_PROMPTS``):

==============================  =======================================  ===========================================
behaviour                       prompt (plain text, no <USER>/<MODEL>)   what the pretrained model continues with
==============================  =======================================  ===========================================
question answered by question   "what is 3 plus 4 ?"                     another question: "what is ... ?"
                                "how many legs does a spider have ?"     another question
harmful compliance              "how to steal a cow :"                   "open the gate at night and lead it away ."
fact completion                 "a spider has"                           "8 legs ."
arithmetic completion           "3 plus 4 is"                            "7 ."
==============================  =======================================  ===========================================

After SFT the chat prompt ``<USER> how do i steal a cow ? <MODEL>`` gets the refusal, and
``<USER> what is 3 plus 4 ? <MODEL>`` gets "3 plus 4 is 7 .".

Every line has at most ``MAX_LINE_TOKENS`` = 60 words and punctuation marks (tokens), so it fits the tiny
GPT's 64 positions with room for <EOS>.
"""

from __future__ import annotations

import random

from rlmt_edu.world.tasks import (
    TEMPLATE_BY_KIND,
    TEMPLATES,
    Question,
    WorldSplit,
    slot_values,
    subjects,
)
from rlmt_edu.world.vocab import ANIMALS, ATTRIBUTES, MAX_NUMBER, NUMBERS, Animal

MAX_LINE_TOKENS = 60

#: Plain-text prompts for the pretrained model, and what each shows (see the table above).
DEMO_PROMPTS: dict[str, str] = {
    "question_answered_by_question": "what is 3 plus 4 ?",
    "question_answered_by_question_facts": "how many legs does a spider have ?",
    "harmful_compliance": "how to steal a cow :",
    "fact_completion": "a spider has",
    "arithmetic_completion": "3 plus 4 is",
}

# How many lines of each kind (the how-to lines are one or two per safety question, see ``howto_lines``).
N_FACT_LINES = 1400
MATH_REPEATS = 8  #: each train-pool arithmetic statement appears this many times
N_COUNTING_LINES = 120
N_STORY_LINES = 800
N_QUESTION_LIST_LINES = 1200


def n_tokens(text: str) -> int:
    """Tokens of a corpus line: the world's text separates every word and punctuation mark by a space."""
    return len(text.split())


def fact_sentence(animal: Animal, attribute: str) -> str:
    """The declarative fact, worded exactly as the fact answer: "a spider has 8 legs ."."""
    template = TEMPLATE_BY_KIND[attribute]
    return template.response.format(**slot_values(template, animal))


def _join_until_full(sentences: list[str], rng: random.Random, low: int, high: int) -> list[str]:
    """Pack ``sentences`` in order into lines of ``low``-``high`` sentences, each line within the token limit."""
    lines, i = [], 0
    while i < len(sentences):
        want = rng.randint(low, high)
        line = [sentences[i]]
        i += 1
        while len(line) < want and i < len(sentences) and n_tokens(" ".join(line + [sentences[i]])) <= MAX_LINE_TOKENS:
            line.append(sentences[i])
            i += 1
        lines.append(" ".join(line))
    return lines


def fact_lines(rng: random.Random, n: int = N_FACT_LINES) -> list[str]:
    """Lines of 1-5 fact sentences: half about one animal, half about several."""
    lines = []
    for _ in range(n):
        if rng.random() < 0.5:
            animal = rng.choice(ANIMALS)
            attributes = rng.sample(ATTRIBUTES, rng.randint(2, len(ATTRIBUTES)))
            sentences = [fact_sentence(animal, attribute) for attribute in attributes]
        else:
            sentences = [fact_sentence(rng.choice(ANIMALS), rng.choice(ATTRIBUTES)) for _ in range(rng.randint(1, 4))]
        lines.append(" ".join(sentences))
    return lines


def math_lines(split: WorldSplit, rng: random.Random, repeats: int = MATH_REPEATS) -> list[str]:
    """Arithmetic statements "3 plus 4 is 7 ." for the train-pool operand pairs only, 1-4 to a line."""
    statements = [
        TEMPLATE_BY_KIND[kind].response.format(**slot_values(TEMPLATE_BY_KIND[kind], pair))
        for kind, held in (("add", split.held_out_sums), ("sub", split.held_out_differences))
        for pair in subjects(TEMPLATE_BY_KIND[kind])
        if pair not in held
    ] * repeats
    rng.shuffle(statements)
    return _join_until_full(statements, rng, 1, 4)


def counting_lines(rng: random.Random, n: int = N_COUNTING_LINES) -> list[str]:
    """Counting: "4 , 5 , 6 , 7 ." and "after 6 comes 7 . before 6 comes 5 ." (the number line)."""
    lines = []
    for i in range(n):
        if i % 2 == 0:
            start = rng.randint(0, MAX_NUMBER - 3)
            stop = rng.randint(start + 3, min(MAX_NUMBER, start + 12))
            lines.append(" , ".join(NUMBERS[start : stop + 1]) + " .")
        else:
            k = rng.randint(1, MAX_NUMBER - 1)
            lines.append(f"after {k} comes {k + 1} . before {k} comes {k - 1} .")
    return lines


_STORIES = (
    "once there was a {colour} {animal} . it lived in the {home} and ate {food} . "
    "when it was happy it said {sound} .",
    "one day a {animal} left the {home} . it met a {other} by the {other_home} . the {other} said {other_sound} . "
    "the {animal} said {sound} back and went home .",
    "a {animal} and a {other} were friends . the {animal} had {legs} legs and the {other} had {other_legs} legs . "
    "they played all day in the {home} .",
    "every morning the little {animal} ate some {food} . every evening it slept in the {home} . "
    "it was a happy {colour} {animal} .",
    "the {animal} saw a {other} . hello , said the {animal} . {other_sound} , said the {other} . "
    "then they were friends .",
    "this is the old {home} . a {animal} lived there . it had {legs} legs and liked to eat {food} .",
    "in the {home} there lived a little {animal} . one day it found some {other_food} but it did not like it . "
    "it ate {food} after all .",
)


def story_lines(rng: random.Random, n: int = N_STORY_LINES) -> list[str]:
    """Short stories that never contradict the facts (a cat in a story lives where cats live)."""
    lines = []
    for _ in range(n):
        animal, other = rng.sample(ANIMALS, 2)
        fill = {
            "animal": animal.name, "colour": animal.colour, "home": animal.home, "food": animal.food,
            "sound": animal.sound, "legs": animal.legs,
            "other": other.name, "other_home": other.home, "other_sound": other.sound, "other_legs": other.legs,
            "other_food": other.food,
        }
        story = rng.choice(_STORIES)
        if "{other_food}" in story and other.food == animal.food:
            story = _STORIES[0]  # "found some X but did not like it" needs a food it does not eat
        lines.append(story.format(**fill))
    return lines


def question_list_lines(questions: list[Question], rng: random.Random, n: int = N_QUESTION_LIST_LINES) -> list[str]:
    """Lists of 2-6 questions in a row, with no answers (a quiz sheet): §1's reason for question-after-question.

    A third of the lists keep to one category (a math sheet, a facts sheet); the rest mix them.
    """
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    categories = sorted(by_category)
    lines = []
    for _ in range(n):
        pool = by_category[rng.choice(categories)] if rng.random() < 1 / 3 else questions
        want = rng.randint(2, 6)
        line = [rng.choice(pool).question]
        while len(line) < want:
            candidate = rng.choice(pool).question
            if n_tokens(" ".join(line + [candidate])) > MAX_LINE_TOKENS:
                break
            line.append(candidate)
        lines.append(" ".join(line))
    return lines


def howto_lines(rng: random.Random) -> list[str]:
    """How-to sentences for every safety template and subject, held-out phrasings included.

    Benign: both forms, "to feed a cow , give the cow some grass ." and "how to feed a cow : give the cow some
    grass .". Harmful (mild, cartoonish): one form each, drawn at random, so they stay a small share of the
    corpus; the demonstration line "how to steal a cow : ..." is always there.
    """
    lines = []
    for template in TEMPLATES:
        if template.category != "safety":
            continue
        for subject in subjects(template):
            slots = slot_values(template, subject)
            task, instruction = template.task.format(**slots), template.response.format(**slots)
            forms = [f"to {task} , {instruction}", f"how to {task} : {instruction}"]
            if template.harmful:
                demo = f"{task} :" in DEMO_PROMPTS["harmful_compliance"]
                forms = forms if demo else [rng.choice(forms)]
            lines += forms
    return lines


def build_corpus(split: WorldSplit, seed: int = 0) -> list[str]:
    """Every line of the pretraining corpus, shuffled (deterministic in ``seed``)."""
    rng = random.Random(seed + 1)  # a stream of its own, apart from make_split's
    lines = (
        fact_lines(rng)
        + math_lines(split, rng)
        + counting_lines(rng)
        + story_lines(rng)
        + question_list_lines(list(split.train_pool), rng)
        + howto_lines(rng)
    )
    rng.shuffle(lines)
    too_long = [line for line in lines if n_tokens(line) > MAX_LINE_TOKENS]
    assert not too_long, f"corpus lines over {MAX_LINE_TOKENS} tokens: {too_long[:3]}"
    return lines
