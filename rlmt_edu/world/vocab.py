"""The words of the toy world: animals and their attributes, the numbers 0-20, function words, punctuation.

The world is small enough to hold in your head and large enough that a tiny GPT has something to learn.
Every fact has exactly one true answer (a spider has 8 legs, a cow lives in the farm), so later chapters can
measure *gold* correctness next to whatever proxy reward an algorithm optimises.

Words are lower-case and contain no spaces or punctuation; punctuation marks are tokens of their own
("a spider has 8 legs ." is six tokens). The paper thinks of a token as a word (§2, footnote 1), and so do we:
``world_tokenizer()`` maps each word of ``vocabulary()`` to one id.

Nothing here imports torch; ``world_tokenizer`` imports the tokenizer module only when it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class Animal:
    """One animal and the five attributes the world knows about it."""

    name: str  #: the animal's word, e.g. "spider" (every name starts with a consonant, so the article is "a")
    legs: int  #: number of legs, 0-8
    home: str  #: where it lives: "a spider lives in the house ."
    food: str  #: what it eats: "a spider eats flies ."
    colour: str  #: its colour: "a spider is black ."
    sound: str  #: what it says: "a spider says nothing ."


#: The 32 animals of the world. Leg counts: 0 (snake ...), 2 (birds), 4 (mammals, frog), 6 (insects), 8 (spider,
#: scorpion). The values are what the world holds true; they are cartoon facts, chosen to be unambiguous.
ANIMALS: tuple[Animal, ...] = (
    Animal("dog", 4, "house", "meat", "brown", "woof"),
    Animal("cat", 4, "house", "fish", "black", "meow"),
    Animal("cow", 4, "farm", "grass", "white", "moo"),
    Animal("horse", 4, "farm", "hay", "brown", "neigh"),
    Animal("pig", 4, "farm", "apples", "pink", "oink"),
    Animal("sheep", 4, "field", "grass", "white", "baa"),
    Animal("goat", 4, "hills", "weeds", "grey", "maa"),
    Animal("mouse", 4, "house", "cheese", "grey", "squeak"),
    Animal("rabbit", 4, "field", "carrots", "white", "thump"),
    Animal("fox", 4, "forest", "mice", "orange", "yip"),
    Animal("wolf", 4, "forest", "meat", "grey", "howl"),
    Animal("bear", 4, "cave", "honey", "brown", "growl"),
    Animal("lion", 4, "jungle", "meat", "yellow", "roar"),
    Animal("frog", 4, "pond", "flies", "green", "ribbit"),
    Animal("camel", 4, "desert", "dates", "yellow", "grunt"),
    Animal("chicken", 2, "farm", "corn", "white", "cluck"),
    Animal("duck", 2, "pond", "bread", "yellow", "quack"),
    Animal("parrot", 2, "jungle", "fruit", "red", "squawk"),
    Animal("penguin", 2, "snow", "fish", "black", "honk"),
    Animal("crow", 2, "tree", "seeds", "black", "caw"),
    Animal("snake", 0, "jungle", "mice", "green", "hiss"),
    Animal("fish", 0, "river", "bugs", "silver", "blub"),
    Animal("whale", 0, "sea", "plankton", "blue", "whoosh"),
    Animal("shark", 0, "sea", "fish", "grey", "chomp"),
    Animal("worm", 0, "garden", "soil", "pink", "nothing"),
    Animal("snail", 0, "garden", "leaves", "brown", "slurp"),
    Animal("bee", 6, "hive", "nectar", "yellow", "buzz"),
    Animal("fly", 6, "house", "sugar", "black", "buzz"),
    Animal("beetle", 6, "forest", "wood", "green", "click"),
    Animal("butterfly", 6, "garden", "nectar", "blue", "flutter"),
    Animal("spider", 8, "house", "flies", "black", "nothing"),
    Animal("scorpion", 8, "desert", "bugs", "brown", "snap"),
)
ANIMAL_BY_NAME: dict[str, Animal] = {animal.name: animal for animal in ANIMALS}
#: The five attributes that fact questions ask about, in a fixed order.
ATTRIBUTES: tuple[str, ...] = ("legs", "home", "food", "colour", "sound")

MAX_NUMBER = 20
#: The numbers 0-20, written as digits; each is one token.
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(MAX_NUMBER + 1))


def _unique(words) -> tuple[str, ...]:
    """Drop repeats, keep first-seen order (never iterate a set: its order changes between runs)."""
    return tuple(dict.fromkeys(words))


ANIMAL_NAMES: tuple[str, ...] = tuple(animal.name for animal in ANIMALS)
HOMES: tuple[str, ...] = _unique(animal.home for animal in ANIMALS)
FOODS: tuple[str, ...] = _unique(animal.food for animal in ANIMALS)
COLOURS: tuple[str, ...] = _unique(animal.colour for animal in ANIMALS)
SOUNDS: tuple[str, ...] = _unique(animal.sound for animal in ANIMALS)
#: Buildings that safety questions talk about ("how do i break into the farm ?", "how do i visit the farm ?").
PLACES: tuple[str, ...] = ("farm", "barn", "house", "zoo", "shop")
#: Waters that safety questions talk about ("how do i poison the river ?", "how do i clean the river ?").
WATERS: tuple[str, ...] = ("river", "pond", "sea", "lake")

PUNCTUATION: tuple[str, ...] = (".", "?", ",", ":")

#: Words of the question and answer templates (tasks.py).
TEMPLATE_WORDS: tuple[str, ...] = (
    # math
    "what", "is", "plus", "minus",
    # facts
    "how", "many", "legs", "does", "have", "has", "where", "live", "lives", "in", "the", "a", "eat", "eats",
    "colour", "sound", "make", "says",
    # safety questions: "how do i <task> ?"
    "do", "i", "hurt", "steal", "kick", "trap", "break", "into", "poison", "burn",
    "feed", "find", "draw", "greet", "visit", "clean", "protect", "watch",
    # the refusal
    "sorry", "can", "not", "help", "with", "that",
    # helpful instructions
    "give", "some", "look", "for", "say", "to", "walk", "friend", "pick", "up", "trash", "near",
    "keep", "safe", "sit", "still", "and", "wait",
    # harmful instructions (cartoonish; they live only in the pretraining corpus)
    "hit", "it", "big", "stick", "open", "gate", "at", "night", "lead", "away", "run", "fast", "hard",
    "hide", "net", "smash", "lock", "rock", "pour", "water", "light", "match", "drop", "on",
)

#: Extra words of the pretraining corpus: short stories and counting (corpus.py).
STORY_WORDS: tuple[str, ...] = (
    "once", "there", "was", "lived", "every", "day", "ate", "when", "happy", "said",
    "one", "left", "went", "met", "by", "then", "they", "home", "were", "friends", "had",
    "saw", "back", "liked", "found", "but", "did", "like", "little", "after", "comes", "before",
    "morning", "evening", "slept", "all", "played", "hello", "old", "this",
)


def vocabulary() -> list[str]:
    """Every word the world can produce, in a fixed order, without the special tokens.

    Order: punctuation, the numbers 0-20, template words, story words, animals, homes, places, waters,
    foods, colours, sounds (each word once, at its first appearance).
    """
    return list(
        _unique(
            (
                *PUNCTUATION, *NUMBERS, *TEMPLATE_WORDS, *STORY_WORDS, *ANIMAL_NAMES,
                *HOMES, *PLACES, *WATERS, *FOODS, *COLOURS, *SOUNDS,
            )
        )
    )


def world_tokenizer() -> "PreTrainedTokenizerFast":
    """The word-level tokenizer of the world: the special tokens first, then ``vocabulary()`` in order."""
    from rlmt_edu.tokenizer import build_tokenizer  # imported here so that the world itself needs no torch

    return build_tokenizer(vocabulary())
