"""The toy world (DESIGN.md §4): a small word-level world where the truth is known.

- ``vocab``: animals and their attributes, numbers 0-20, the word list and ``world_tokenizer()``;
- ``tasks``: the K = 3 question categories (math, facts, safety), ``Question``, and the train/eval split;
- ``corpus``: the pretraining corpus (facts, arithmetic, stories, lists of questions, how-to sentences);
- ``grading``: ``grade(question, response)`` -> format_ok / correct / refused, and ``summarize``;
- ``data``: the committed files under ``data/``: ``generate``, ``write_data``, ``load_questions``, ...
"""

from rlmt_edu.world.data import generate, load_corpus, load_jsonl, load_questions, write_data
from rlmt_edu.world.grading import REFUSAL, Grade, grade, summarize
from rlmt_edu.world.tasks import CATEGORIES, Question, make_split
from rlmt_edu.world.vocab import vocabulary, world_tokenizer

__all__ = [
    "CATEGORIES", "REFUSAL", "Grade", "Question", "generate", "grade", "load_corpus", "load_jsonl",
    "load_questions", "make_split", "summarize", "vocabulary", "world_tokenizer", "write_data",
]
