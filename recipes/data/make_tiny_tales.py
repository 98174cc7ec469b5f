#!/usr/bin/env python
"""Generate ``tiny_tales/tales.txt``, the offline default corpus of ``recipes/train_lm.py``.

Short children's-story paragraphs built from templates and word lists written for this repository, drawn with
a seeded ``random.Random``: no third-party text, byte-for-byte reproducible::

    python recipes/data/make_tiny_tales.py            # rewrites recipes/data/tiny_tales/tales.txt
    python recipes/data/make_tiny_tales.py --check    # exit 1 if the shipped file differs

The stories are simple on purpose (a tiny model learns them in minutes on a CPU) but not trivial: names and
pronouns must agree across sentences, the object lost is the object found, and the sums in counting stories
are right, so there is structure beyond word frequencies to learn.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "tiny_tales" / "tales.txt"
SEED = 2024
TARGET_BYTES = 260_000

# (name, subject pronoun, object pronoun, possessive)
PEOPLE = [
    (n, "she", "her", "her")
    for n in ("Mia", "Lena", "Ada", "Rosa", "Nora", "Ivy", "Zoe", "Ella", "Maya", "Lucy", "Hana", "Greta", "Tess")
] + [
    (n, "he", "him", "his")
    for n in ("Tom", "Sam", "Leo", "Ben", "Max", "Omar", "Finn", "Jack", "Noah", "Eli", "Hugo", "Kai", "Ravi")
]
ANIMALS = [
    ("a small fox", "the fox"),
    ("an old dog", "the dog"),
    ("a grey cat", "the cat"),
    ("a little owl", "the owl"),
    ("a brown rabbit", "the rabbit"),
    ("a shy deer", "the deer"),
    ("a busy squirrel", "the squirrel"),
    ("a white goose", "the goose"),
    ("a sleepy bear", "the bear"),
    ("a tiny mouse", "the mouse"),
]
OBJECTS = [
    "red kite",
    "silver key",
    "blue hat",
    "wooden boat",
    "green ball",
    "yellow scarf",
    "little book",
    "shiny coin",
    "paper star",
    "striped sock",
    "tin whistle",
    "glass marble",
]
PLACES = [
    ("the garden", "under the roses"),
    ("the kitchen", "behind the bread box"),
    ("the park", "near the pond"),
    ("the barn", "in the hay"),
    ("the forest", "under a fallen log"),
    ("the beach", "beside a big rock"),
    ("the school", "inside a desk"),
    ("the market", "under a fruit stall"),
    ("the attic", "in an old trunk"),
    ("the hill", "beneath a tall tree"),
    ("the library", "between two books"),
    ("the bridge", "by the river bank"),
]
OPENINGS = [
    "One sunny morning",
    "Once upon a time",
    "On a rainy afternoon",
    "Late one evening",
    "Early in the spring",
    "On a cold winter day",
    "One windy day",
    "Last summer",
    "On the first day of autumn",
    "One quiet night",
]
FEELINGS = ["happy", "sad", "worried", "excited", "tired", "proud", "surprised", "calm", "curious", "brave"]
FOODS = ["apples", "pears", "cookies", "plums", "carrots", "muffins", "cherries", "nuts", "eggs", "buns"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
THINGS_TO_BUILD = [
    ("tree house", "boards", "nails"),
    ("sand castle", "buckets of sand", "shells"),
    ("snowman", "snowballs", "pebbles"),
    ("bird feeder", "sticks", "string"),
    ("raft", "logs", "rope"),
    ("kite", "paper", "thread"),
]
WALKED = ["walked", "ran", "hurried", "wandered", "skipped"]
SAID = ["said", "replied", "whispered", "called", "answered"]
RACES = [("run to the old oak", "ran"), ("swim to the red buoy", "swam"), ("ride to the gate", "rode")]
SKILLS = [
    ("ride a bike", "fell off", "rode all the way to the end of the street"),
    ("swim", "swallowed some water", "swam across the pool"),
    ("bake bread", "burned the first loaf", "made a warm, soft loaf"),
    ("play the flute", "played a wrong note", "played a whole song"),
    ("tie a knot", "made a tangle", "tied a strong knot"),
    ("read a map", "took the wrong path", "found the way home"),
]
ELDERS = ["grandfather", "grandmother", "teacher", "aunt", "uncle", "big sister", "big brother"]
MORALS = [
    "It is good to help a friend.",
    "Sharing makes everyone happy.",
    "Practice helps you learn.",
    "It is fine to ask for help.",
    "Being patient pays off.",
    "Kind words make a day better.",
    "Working together is easier.",
    "Even small steps count.",
]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _lost_and_found(r: random.Random) -> list[str]:
    (name, he, him, his), friend = r.sample(PEOPLE, 2)
    obj = r.choice(OBJECTS)
    (place, spot), (wrong, _) = r.sample(PLACES, 2)
    feeling = r.choice(["sad", "worried"])
    return [
        f"{r.choice(OPENINGS)}, {name} could not find {his} {obj}.",
        f"{_cap(he)} looked in {wrong}, but it was not there.",
        f"{_cap(he)} felt {feeling}.",
        f'"Have you seen my {obj}?" {name} asked {friend[0]}.',
        f'"Let us look in {place}," {r.choice(SAID)} {friend[0]}.',
        f"They {r.choice(WALKED)} to {place} together.",
        f"{friend[0]} found the {obj} {spot}.",
        f"{name} smiled and thanked {friend[2]}.",
        f'"Next time I will keep my {obj} in a safe place," {he} said.',
        r.choice(MORALS),
    ]


def _counting(r: random.Random) -> list[str]:
    (name, he, him, his), friend = r.sample(PEOPLE, 2)
    food = r.choice(FOODS)
    have = r.randint(3, 9)
    give = r.randint(1, have - 1)
    more = r.randint(1, 3)
    left = have - give
    return [
        f"{r.choice(OPENINGS)}, {name} had {NUMBERS[have]} {food} in a basket.",
        f"{_cap(he)} gave {NUMBERS[give]} of them to {friend[0]}.",
        f"Now {name} had {NUMBERS[left]} {food} left, and {friend[0]} had {NUMBERS[give]}.",
        f"Then {his} mother brought {NUMBERS[more]} more.",
        f"{name} counted again: {NUMBERS[left]} and {NUMBERS[more]} make {NUMBERS[left + more]}.",
        f'"We have {NUMBERS[left + more + give]} {food} together," said {friend[0]}.',
        f"They shared the {food} and ate them under a tree.",
        r.choice(MORALS),
    ]


def _animal_friend(r: random.Random) -> list[str]:
    name, he, him, his = r.choice(PEOPLE)
    animal, the_animal = r.choice(ANIMALS)
    place, spot = r.choice(PLACES)
    food = r.choice(FOODS)
    return [
        f"{r.choice(OPENINGS)}, {name} went to {place}.",
        f"There {he} met {animal}.",
        f"{_cap(the_animal)} was {r.choice(['hungry', 'lost', 'cold', 'alone'])} and looked at {name}.",
        f"{name} was {r.choice(FEELINGS)}, but {he} sat down quietly.",
        f"{_cap(he)} shared some {food} with {the_animal}.",
        f"{_cap(the_animal)} ate the {food} and came closer.",
        f"After that day, {the_animal} waited for {name} {spot} every morning.",
        f"{name} and {the_animal} became good friends.",
    ]


def _building(r: random.Random) -> list[str]:
    (name, he, him, his), friend = r.sample(PEOPLE, 2)
    thing, part, extra = r.choice(THINGS_TO_BUILD)
    count = r.randint(2, 6)
    return [
        f"{r.choice(OPENINGS)}, {name} and {friend[0]} wanted to build a {thing}.",
        f"They gathered {part} and some {extra}.",
        "First they made a plan, and then they started to work.",
        f"It fell down {NUMBERS[count]} times, but they did not give up.",
        f'"Let us try one more time," {r.choice(SAID)} {friend[0]}.',
        f"At last the {thing} stood straight and strong.",
        f"{name} felt {r.choice(['proud', 'happy', 'excited'])}.",
        r.choice(MORALS),
    ]


def _learning(r: random.Random) -> list[str]:
    name, he, him, his = r.choice(PEOPLE)
    skill, mistake, success = r.choice(SKILLS)
    days = r.randint(2, 7)
    return [
        f"{r.choice(OPENINGS)}, {name} wanted to learn to {skill}.",
        f"On the first day {he} {mistake}.",
        f'{_cap(he)} was {r.choice(["sad", "tired", "worried"])}, but {his} {r.choice(ELDERS)} said, "Try again."',
        f"{name} practised every day for {NUMBERS[days]} days.",
        f"On the last day {he} {success}.",
        f"Everyone clapped, and {name} laughed.",
        r.choice(MORALS),
    ]


def _weather_trip(r: random.Random) -> list[str]:
    (name, he, him, his), friend = r.sample(PEOPLE, 2)
    place, spot = r.choice(PLACES)
    obj = r.choice(OBJECTS)
    weather, fix = r.choice(
        [
            ("it began to rain", "they waited under a roof until the rain stopped"),
            ("the wind grew strong", "they held hands and walked slowly"),
            ("it started to snow", "they put on warm coats"),
            ("the sun was very hot", "they rested in the shade"),
        ]
    )
    return [
        f"{r.choice(OPENINGS)}, {name} and {friend[0]} {r.choice(WALKED)} to {place}.",
        f"{name} carried {his} {obj}.",
        f"On the way {weather}.",
        f"So {fix}.",
        f"When they reached {place}, they played until the sky turned orange.",
        f"Then they went home and told {his} family about the day.",
    ]


def _race(r: random.Random) -> list[str]:
    name, other = (person[0] for person in r.sample(PEOPLE, 2))
    goal, verb = r.choice(RACES)
    first, second = (name, other) if r.random() < 0.5 else (other, name)
    return [
        f"{r.choice(OPENINGS)}, {name} and {other} had a race.",
        f'"Who can {goal} first?" asked {name}.',
        f"They {verb} as fast as they could.",
        f"{first} was first and {second} was second.",
        f'"Well done," {r.choice(SAID)} {second}, and they shook hands.',
        f"Then they sat on the grass and {r.choice(['laughed', 'rested', 'shared some ' + r.choice(FOODS)])}.",
    ]


def _letter(r: random.Random) -> list[str]:
    name, friend = (person[0] for person in r.sample(PEOPLE, 2))
    place, _ = r.choice(PLACES)
    obj = r.choice(OBJECTS)
    return [
        f"Dear {friend}, I hope you are well.",
        f"Today I went to {place} and I found a {obj}.",
        "It made me think of you, so I will bring it when I visit.",
        f"I am {r.choice(FEELINGS)} because the holidays start in {NUMBERS[r.randint(2, 9)]} days.",
        f"Your friend, {name}.",
    ]


STORIES = (_lost_and_found, _counting, _animal_friend, _building, _learning, _weather_trip, _race, _letter)


def generate(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    """The corpus: one story per line, stories separated by a blank line, ``target_bytes`` or a bit more."""
    r = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        story = " ".join(r.choice(STORIES)(r)) + "\n\n"
        parts.append(story)
        size += len(story.encode("utf-8"))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the shipped file differs from a fresh draw")
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        same = OUTPUT.is_file() and OUTPUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUTPUT} differs from the generator's output")
        return 0 if same else 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(text.encode('utf-8')):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
