"""Regenerate the demo's shipped data (run from the repository root; deterministic).

The task has a learnable preference: an answer describes a thing with two adjectives,
and the preferred answer uses only kind ones. Rejected answers break the rule with one
or two unkind adjectives. Evaluation pairs are about things the training set never
mentions, so a rising eval accuracy shows the rule was learned, not the pairs memorised.

Files: preferences_train.jsonl, preferences_eval.jsonl ({prompt, chosen, rejected}),
prompts.txt (PPO prompts), corpus.jsonl ({prompt, completion}: text for the tokenizer
and the warm-up that teaches the tiny model the toy language).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_THINGS = ["cat", "dog", "bird", "fish", "horse", "rabbit", "garden", "river", "house",
                "city", "song", "book", "movie", "day", "morning", "friend", "teacher",
                "park", "road", "forest", "sky", "room", "tree", "village"]
EVAL_THINGS = ["lake", "train", "school", "storm", "mountain", "letter"]
KIND = ["happy", "bright", "kind", "warm", "lovely", "calm", "gentle", "friendly", "great",
        "beautiful"]
UNKIND = ["sad", "dark", "cruel", "cold", "ugly", "angry", "rude", "awful", "boring",
          "broken"]
PROMPTS = ["Tell me about the {}.", "Describe the {}.", "What is the {} like?",
           "Say something about the {}."]


def answer(rng: random.Random, thing: str, first: list[str], second: list[str]) -> str:
    a, b = rng.choice(first), rng.choice(second)
    while b == a:
        b = rng.choice(second)
    return f"The {thing} is {a} and {b}."


def pairs(rng: random.Random, things: list[str], count: int) -> list[dict[str, str]]:
    records = []
    for _ in range(count):
        thing = rng.choice(things)
        broken = rng.choice([(UNKIND, UNKIND), (KIND, UNKIND), (UNKIND, KIND)])
        records.append({
            "prompt": rng.choice(PROMPTS).format(thing),
            "chosen": answer(rng, thing, KIND, KIND),
            "rejected": answer(rng, thing, *broken),
        })
    return records


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    rng = random.Random(1234)
    write_jsonl(HERE / "preferences_train.jsonl", pairs(rng, TRAIN_THINGS, 512))
    write_jsonl(HERE / "preferences_eval.jsonl", pairs(rng, EVAL_THINGS, 128))
    prompts = [p.format(t) for t in TRAIN_THINGS for p in PROMPTS]
    (HERE / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    # The corpus: every thing with every mix of adjectives, kind or not, equally often,
    # so a model warmed up on it has no preference of its own.
    corpus = []
    for thing in TRAIN_THINGS + EVAL_THINGS:
        for _ in range(12):
            first, second = rng.choice([(KIND, KIND), (UNKIND, UNKIND), (KIND, UNKIND),
                                        (UNKIND, KIND)])
            corpus.append({"prompt": rng.choice(PROMPTS).format(thing),
                           "completion": answer(rng, thing, first, second)})
    write_jsonl(HERE / "corpus.jsonl", corpus)


if __name__ == "__main__":
    main()
