"""Writes corpus.txt: a small character-level training corpus of structured
English-like text, generated from a toy grammar with a fixed seed (no
downloads). The regularities (agreement, arithmetic, rhyming couplets,
dialogue turns) give a small GPT something learnable at every scale.

    python examples/data/make_corpus.py [--kbytes 400]
"""
import argparse
import os
import random

NAMES = ["ada", "bram", "cleo", "dov", "esme", "finn", "gita", "hugo", "ines", "jory", "kai", "lena"]
ANIMALS = ["fox", "owl", "hare", "wolf", "crow", "otter", "moth", "toad", "lynx", "heron"]
ADJS = ["red", "small", "quiet", "old", "quick", "pale", "brave", "tired", "clever", "wild"]
PLACES = ["river", "hill", "forest", "harbor", "market", "tower", "meadow", "bridge", "garden", "cave"]
VERBS = [("saw", "sees"), ("followed", "follows"), ("helped", "helps"), ("found", "finds"), ("called", "calls")]
MOVES = [("ran", "runs"), ("walked", "walks"), ("flew", "flies"), ("swam", "swims"), ("crept", "creeps")]
REASONS = ["it was cold", "the sun was low", "the bell rang", "a storm was near", "the path was long",
           "night was falling", "the water was high", "someone was singing"]
RHYMES = [("light", "night"), ("stone", "alone"), ("rain", "again"), ("sea", "free"), ("day", "away"),
          ("tree", "me"), ("moon", "soon"), ("door", "more")]


def noun(r):
    return f"the {r.choice(ADJS)} {r.choice(ANIMALS)}"


def story(r):
    past = r.random() < 0.5
    k = 0 if past else 1
    who = r.choice(NAMES)
    lines = [f"{who} {r.choice(VERBS)[k]} {noun(r)} near the {r.choice(PLACES)}."]
    for _ in range(r.randint(1, 3)):
        lines.append(f"{noun(r)} {r.choice(MOVES)[k]} to the {r.choice(PLACES)} because {r.choice(REASONS)}.")
    lines.append(f"then {who} {r.choice(MOVES)[k]} home.")
    return " ".join(lines)


def arithmetic(r):
    a, b = r.randint(0, 99), r.randint(0, 99)
    op = r.choice("+-*")
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}."


def couplet(r):
    w1, w2 = r.choice(RHYMES)
    return (f"the {r.choice(ANIMALS)} sang of {w1},\n"
            f"and the {r.choice(ADJS)} {r.choice(PLACES)} answered {w2}.")


def dialogue(r):
    a, b = r.sample(NAMES, 2)
    place = r.choice(PLACES)
    return (f"{a}: where is the {r.choice(ANIMALS)}?\n"
            f"{b}: it is at the {place}.\n"
            f"{a}: then i will go to the {place}.")


def counting(r):
    start, step = r.randint(1, 50), r.randint(1, 9)
    return "count: " + ", ".join(str(start + i * step) for i in range(r.randint(4, 8))) + "."


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kbytes", type=int, default=400)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt"))
    args = parser.parse_args()
    r = random.Random(1234)
    kinds = [story, story, story, arithmetic, couplet, dialogue, counting]
    parts, size = [], 0
    while size < args.kbytes * 1000:
        p = r.choice(kinds)(r)
        parts.append(p)
        size += len(p) + 2
    with open(args.out, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    print(f"wrote {size} bytes to {args.out}")


if __name__ == "__main__":
    main()
