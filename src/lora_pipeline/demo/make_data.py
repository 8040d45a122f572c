"""Generate the demo's shipped datasets: a topic-classification instruction set and a held-out eval set.

Run ``python -m lora_pipeline.demo.make_data`` to regenerate ``demo/data/train.jsonl`` and
``demo/task/demo_topic_test.jsonl``. The output is fully deterministic (fixed seed, no hash-ordered
iteration), so re-running it on an unchanged script yields byte-identical files.

The task: a sentence mentions exactly one keyword from one of five categories; the model must answer
with the category name. Train and eval share the keyword vocabulary and the filler words, but eval
sentences use an extra sentence structure never seen in training plus new filler combinations, so a
model only scores well if it learned "find the keyword, map it to its category" rather than
memorising sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
TRAIN_PER_KEYWORD = 10  # 16 keywords x 5 categories x 10 = 800 training rows
EVAL_PER_CATEGORY = 40  # 200 eval rows, balanced, chance = 20%

# Order matters: it is the lm-eval choice order and the label index.
CATEGORIES: dict[str, list[str]] = {
    "animal": [
        "dog", "cat", "horse", "rabbit", "fox", "wolf", "bear", "tiger",
        "lion", "mouse", "goat", "sheep", "deer", "owl", "duck", "frog",
    ],
    "fruit": [
        "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear",
        "plum", "orange", "melon", "kiwi", "apricot", "lime", "fig", "papaya",
    ],
    "tool": [
        "hammer", "wrench", "hacksaw", "drill", "chisel", "shovel", "rake", "axe",
        "pliers", "screwdriver", "spanner", "trowel", "crowbar", "clamp", "mallet", "sander",
    ],
    "vehicle": [
        "car", "bus", "truck", "bicycle", "tram", "tractor", "van", "taxi",
        "scooter", "motorbike", "lorry", "jeep", "wagon", "sled", "ambulance", "minibus",
    ],
    "instrument": [
        "guitar", "piano", "violin", "drum", "flute", "trumpet", "cello", "harp",
        "banjo", "clarinet", "oboe", "tuba", "saxophone", "ukulele", "trombone", "accordion",
    ],
}  # fmt: skip
CHOICES: list[str] = list(CATEGORIES)

# Filler phrases carry no category signal: every one of them is used with every category.
SUBJECTS = [
    "my sister", "the old man", "a neighbour", "our teacher", "the little boy",
    "my friend", "the farmer", "a stranger", "my uncle", "the young girl",
]  # fmt: skip
VERBS = [
    "found", "painted", "talked about", "looked at", "wanted", "drew",
    "photographed", "forgot", "noticed", "moved", "described", "liked",
]  # fmt: skip
PLACES = [
    "near the river", "in the garden", "at the market", "behind the school",
    "on the hill", "in the kitchen", "by the station", "at the fair",
]  # fmt: skip
TIMES = ["yesterday", "this morning", "last week", "after lunch", "every day", "on sunday"]

# Each structure fills {kw} plus filler slots. The varied word orders in training teach the model to find
# the keyword wherever it is; eval adds two orders never seen in training.
TRAIN_STRUCTURES = [
    "{subj} {verb} the {kw} {place} {time}.",
    "The {kw} was {place} {time}.",
    "{time}, {subj} {verb} the {kw}.",
    "{place}, {subj} {verb} the {kw} {time}.",
    "What {subj} {verb} {place} was the {kw}.",
    "It was the {kw} that {subj} {verb} {time}.",
]
EVAL_ONLY_STRUCTURES = [
    "{time} the {kw} {place} was what {subj} {verb}.",
    "{place} {time}, the {kw} was what {subj} {verb}.",
]

QUESTION = "Which category does this sentence mention: animal, fruit, tool, vehicle or instrument?\nSentence: {s}"

PACKAGE_DIR = Path(__file__).resolve().parent
TRAIN_FILE = PACKAGE_DIR / "data" / "train.jsonl"
TEST_FILE = PACKAGE_DIR / "task" / "demo_topic_test.jsonl"


def _sentence(rng: random.Random, structure: str, kw: str) -> str:
    text = structure.format(
        kw=kw,
        subj=rng.choice(SUBJECTS),
        verb=rng.choice(VERBS),
        place=rng.choice(PLACES),
        time=rng.choice(TIMES),
    )
    return text[0].upper() + text[1:]


def make_train(rng: random.Random) -> tuple[list[dict], set[str]]:
    """Chat rows (every keyword TRAIN_PER_KEYWORD times, cycling the train structures) + their sentences."""
    rows, sentences = [], set()
    for category, keywords in CATEGORIES.items():
        for kw in keywords:
            for i in range(TRAIN_PER_KEYWORD):
                sentence = _sentence(rng, TRAIN_STRUCTURES[i % len(TRAIN_STRUCTURES)], kw)
                sentences.add(sentence)
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": QUESTION.format(s=sentence)},
                            {"role": "assistant", "content": category},
                        ]
                    }
                )
    rng.shuffle(rows)
    return rows, sentences


def make_eval(rng: random.Random, train_sentences: set[str]) -> list[dict]:
    """Balanced eval rows whose sentences never occur in the training set."""
    rows = []
    for label, (category, keywords) in enumerate(CATEGORIES.items()):
        seen: set[str] = set()
        i = 0
        while len(seen) < EVAL_PER_CATEGORY:
            # Half the eval items use a held-out structure, the rest new combinations of known ones.
            if i % 2 == 0:
                structure = EVAL_ONLY_STRUCTURES[(i // 2) % len(EVAL_ONLY_STRUCTURES)]
            else:
                structure = TRAIN_STRUCTURES[(i // 2) % len(TRAIN_STRUCTURES)]
            sentence = _sentence(rng, structure, keywords[i % len(keywords)])
            i += 1
            if sentence in train_sentences or sentence in seen:
                continue
            seen.add(sentence)
            rows.append(
                {"question": QUESTION.format(s=sentence), "sentence": sentence, "answer": category, "label": label}
            )
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train, train_sentences = make_train(rng)
    test = make_eval(rng, train_sentences)
    _write_jsonl(TRAIN_FILE, train)
    _write_jsonl(TEST_FILE, test)
    print(f"wrote {len(train)} rows to {TRAIN_FILE}")
    print(f"wrote {len(test)} rows to {TEST_FILE}")


if __name__ == "__main__":
    main()
