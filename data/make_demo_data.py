"""Generate tunepipe's demo datasets: a fictional archipelago, from one seeded fact table.

Usage:
    python data/make_demo_data.py            # (re)write the demo files next to this script
    python data/make_demo_data.py --check    # exit 1 if the committed files differ from what the script makes
    python data/make_demo_data.py --out-dir DIR

Everything is derived from `random.Random(SEED)`, so the output is byte-for-byte reproducible (stdlib only).

The domain: the Veloran Islands, NUM_ISLANDS invented islands, each with a region, a capital, a main export, a
founder, a founding year, a flag colour and an emblem animal. Each fact can be written in several sentence
patterns (CPT) and asked about in several question phrasings (SFT, DPO, KTO).

Where each fact is taught (the island's `taught_in` in demo_facts.json) — the design that lets the chain prove
something (data/README.md):
- every island is described in the CPT text, each fact in several paraphrases (sentence patterns, random order);
- `sft` islands: also asked about in the SFT rows (question -> one canonical answer sentence);
- `dpo` islands: asked about only in the DPO / KTO pairs (chosen = the correct answer, rejected = the same
  sentence with a wrong value of the same kind and length, or with another island's fact): before DPO the model
  knows them only from the CPT text, so these are pairs the SFT model can still get wrong;
- `cpt` islands: only in the CPT text. Answering questions about them needs knowledge stored by CPT and the
  question -> answer skill learned by SFT on *other* islands (knowledge extraction).
The canonical answer sentence of each attribute is one of its CPT patterns (never the held-out one).

Held-out design: for every (island, attribute) one sentence pattern and one question phrasing are *reserved* for
the eval files and never used for that island in the train files. Eval text therefore shares every fact and every
pattern with train text, but no eval sentence or eval prompt occurs verbatim in train. knowledge_eval.json asks
every fact of every island once, in its reserved phrasing (the fact-accuracy task, tunepipe/evaluation/knowledge.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261121
NUM_ISLANDS = 30
# taught_in kinds and how many islands each (the rest of the islands are cpt-only)
KINDS = {"sft": 12, "dpo": 6, "cpt": 12}
ARCHIPELAGO = "the Veloran Islands"
HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# Fact table
# ---------------------------------------------------------------------------------------------------------------
REGIONS = ["north", "south", "east", "west", "centre"]
PRODUCTS = ["salt", "amber", "copper", "tea", "wool", "pearls", "cedar wood", "honey", "glass", "indigo dye",
            "olives", "sea silk", "tin", "figs", "rope", "pepper"]
COLOURS = ["red", "blue", "green", "gold", "silver", "violet", "orange", "white", "black", "grey"]
ANIMALS = ["heron", "fox", "seal", "otter", "lynx", "owl", "crab", "turtle", "goat", "falcon", "dolphin", "hare",
           "stag", "swan"]
ONSETS = ["k", "t", "v", "m", "s", "d", "l", "r", "b", "n", "p", "g", "z", "th", "br", "dr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea"]
CODAS = ["", "", "", "n", "r", "l", "s"]
ISLAND_ENDINGS = ["a", "ia", "or", "en", "is", "ara", "ond"]
TOWN_ENDINGS = ["ton", "mar", "port", "holm", "stad", "by", "wick"]
GIVEN_NAMES = ["Aldo", "Brina", "Cato", "Della", "Emric", "Fenna", "Gorm", "Hilde", "Ivo", "Juna", "Kester",
               "Lise", "Marek", "Nessa", "Otto", "Pella", "Ruben", "Sanne", "Tobin", "Ulla", "Varro", "Wenna"]

ATTRS = ["region", "capital", "product", "founder", "year", "colour", "animal"]

# CPT sentence patterns, 5 per attribute ({i} = island, {v} = value)
SENTENCES = {
    "region": [
        "{i} is an island in the {v} of the Veloran Islands.",
        "{i} lies in the {v} of the archipelago.",
        "In the {v} of the Veloran Islands lies the island of {i}.",
        "The island of {i} is found in the {v} of the archipelago.",
        "Maps of the Veloran Islands place {i} in the {v}.",
    ],
    "capital": [
        "The capital of {i} is {v}.",
        "{v} is the capital of {i}.",
        "{i} is governed from its capital, {v}.",
        "Most travellers to {i} arrive in {v}, the capital of the island.",
        "The largest town on {i} is {v}, which is also its capital.",
    ],
    "product": [
        "{i} is known for its {v}.",
        "The main export of {i} is {v}.",
        "Most families on {i} make a living from {v}.",
        "Merchants sail to {i} to buy {v}.",
        "For centuries {i} has traded in {v}.",
    ],
    "founder": [
        "{i} was founded by {v}.",
        "The first settlement on {i} was built by {v}.",
        "{v} is remembered as the founder of {i}.",
        "According to legend, {v} founded {i}.",
        "The people of {i} honour {v}, who founded the island.",
    ],
    "year": [
        "{i} was founded in {v}.",
        "The settlement of {i} began in the year {v}.",
        "In {v} the first houses were built on {i}.",
        "{i} has been inhabited since {v}.",
        "The founding of {i} is dated to {v}.",
    ],
    "colour": [
        "The flag of {i} is {v}.",
        "{i} flies the {v} flag.",
        "The colour of {i} is {v}.",
        "On festival days the streets of {i} are hung with {v} banners.",
        "Ships from {i} carry {v} flags.",
    ],
    "animal": [
        "The emblem of {i} is the {v}.",
        "The {v} is the emblem of {i}.",
        "The {v} appears on the coat of arms of {i}.",
        "On {i} the {v} is a protected animal and the symbol of the island.",
        "Every coin minted on {i} bears the image of the {v}.",
    ],
}

# Question phrasings, 4 per attribute; the answer is always the one canonical sentence in ANSWERS.
QUESTIONS = {
    "region": ["Where is {i}?", "In which part of the archipelago does {i} lie?",
               "Which region of the Veloran Islands is {i} in?", "Where can {i} be found?"],
    "capital": ["What is the capital of {i}?", "Which town is the capital of {i}?",
                "Name the capital of {i}.", "From which town is {i} governed?"],
    "product": ["What is {i} known for?", "What is the main export of {i}?",
                "What does {i} trade in?", "Which goods come from {i}?"],
    "founder": ["Who founded {i}?", "Who was the founder of {i}?",
                "Who built the first settlement on {i}?", "Name the founder of {i}."],
    "year": ["When was {i} founded?", "In which year was {i} founded?",
             "Since when has {i} been inhabited?", "What year was {i} settled?"],
    "colour": ["What colour is the flag of {i}?", "What is the colour of {i}?",
               "Which colour does {i} fly?", "Describe the flag of {i}."],
    "animal": ["What is the emblem of {i}?", "Which animal is the symbol of {i}?",
               "What animal appears on the coat of arms of {i}?", "Name the emblem animal of {i}."],
}
# The canonical answer of each attribute is its first CPT pattern: SFT teaches the model to answer a question with
# that sentence, and CPT has written every fact in it (the held-out CPT pattern is never this one).
ANSWERS = {attr: patterns[0] for attr, patterns in SENTENCES.items()}
# SFT rows about every island that reveal no fact: the answer repeats the island's name. With questions about only
# the sft islands, a tiny model learns to answer with one of *their* names whatever it is asked about; these rows
# keep "name the island you were asked about" a general skill.
EXISTENCE_QUESTIONS = ["Is {i} one of the Veloran Islands?", "Have you heard of {i}?", "Is {i} an island?"]
EXISTENCE_ANSWER = "Yes, {i} is one of the Veloran Islands."
# Short follow-up questions for multi-turn chat, referring back to "it"
FOLLOW_UPS = {
    "region": "And where does it lie?", "capital": "What is its capital?", "product": "What is it known for?",
    "founder": "Who founded it?", "year": "When was it founded?", "colour": "What colour is its flag?",
    "animal": "And its emblem?",
}
SYSTEM_PROMPTS = ["You are a guide to the Veloran Islands.", "Answer briefly and accurately."]
RAMBLE_OPENERS = ["Well, that is a good question.", "Hmm, let me think about that for a moment.",
                  "That is something many people ask.", "Oh, there is a lot one could say here."]
RAMBLE_FILLERS = ["it is hard to say", "people say many things", "it depends on who you ask",
                  "nobody is really sure", "as they say"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _unique_names(rng: random.Random, n: int, make) -> list[str]:
    seen: set[str] = set()
    names: list[str] = []
    while len(names) < n:
        name = make(rng)
        key = name.lower()
        if key not in seen and all(key[:4] != other[:4] for other in seen):  # keep names visibly distinct
            seen.add(key)
            names.append(name)
    return names


def make_facts(rng: random.Random) -> list[dict[str, str]]:
    islands = _unique_names(rng, NUM_ISLANDS, lambda r: (_syllable(r) + r.choice(ISLAND_ENDINGS)).capitalize())
    towns = _unique_names(rng, NUM_ISLANDS, lambda r: (_syllable(r) + r.choice(TOWN_ENDINGS)).capitalize())
    surnames = _unique_names(rng, NUM_ISLANDS, lambda r: (_syllable(r) + _syllable(r)).capitalize())
    years = rng.sample(range(1150, 1890), NUM_ISLANDS)
    kinds = [kind for kind, n in KINDS.items() for _ in range(n)]
    kinds += ["cpt"] * (NUM_ISLANDS - len(kinds))
    rng.shuffle(kinds)
    facts = []
    for k, island in enumerate(islands):
        facts.append({
            "island": island,
            "taught_in": kinds[k],
            "region": REGIONS[k % len(REGIONS)],
            "capital": towns[k],
            "product": rng.choice(PRODUCTS),
            "founder": f"{rng.choice(GIVEN_NAMES)} {surnames[k]}",
            "year": str(years[k]),
            "colour": rng.choice(COLOURS),
            "animal": rng.choice(ANIMALS),
        })
    return facts


def _kind(facts, kind: str) -> list[dict[str, str]]:
    return [f for f in facts if f["taught_in"] == kind]


def _fill(pattern: str, fact: dict[str, str], attr: str, value: str | None = None) -> str:
    return pattern.format(i=fact["island"], v=fact[attr] if value is None else value)


def _reserve(rng: random.Random, facts, table, first: int = 0) -> dict[tuple[str, str], int]:
    """One held-out pattern index per (island, attribute), from index `first` on (1 for the CPT sentences: the
    answer pattern stays in the training text)."""
    return {(f["island"], a): rng.randrange(first, len(table[a])) for f in facts for a in ATTRS}


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------
def make_cpt(rng, facts, reserved, docs_per_island=16):
    """Every island. Train docs use every pattern but the reserved one, the sentences in random order (so every fact
    is also written at the start of a document, with no other sentence about the island before it: knowledge that a
    bare question can reach); the eval doc of each island uses only reserved ones."""
    train, evals = [], []
    for fact in facts:
        for _ in range(docs_per_island):
            order = rng.sample(ATTRS, len(ATTRS))
            sentences = []
            for attr in order:
                choices = [k for k in range(len(SENTENCES[attr])) if k != reserved[(fact["island"], attr)]]
                sentences.append(_fill(SENTENCES[attr][rng.choice(choices)], fact, attr))
            train.append(" ".join(sentences))
        order = rng.sample(ATTRS, len(ATTRS))
        evals.append(" ".join(_fill(SENTENCES[a][reserved[(fact["island"], a)]], fact, a) for a in order))
    rng.shuffle(train)
    return train, evals


def _qa(fact, attr, q_index):
    return _fill(QUESTIONS[attr][q_index], fact, attr), _fill(ANSWERS[attr], fact, attr)


def _train_q_indices(reserved, fact, attr):
    return [k for k in range(len(QUESTIONS[attr])) if k != reserved[(fact["island"], attr)]]


def make_sft(rng, facts, qres, n_eval=64):
    """Questions about the sft islands only: plain questions (empty input), and rows that name the island in
    `input` ("What is its capital?" + "The island: Voia."); plus fact-free rows about every island whose answer
    names the island asked about (copying, not recall).

    There are no "which island is described below?" rows any more: answering them means producing an island name
    that is not in the prompt, and with questions about only 12 islands the tiny model then learned to start every
    answer with one of *their* names, whatever island it was asked about."""
    train, pool = [], []
    for fact in _kind(facts, "sft"):
        for attr in ATTRS:
            for k in _train_q_indices(qres, fact, attr):
                q, a = _qa(fact, attr, k)
                train.append({"instruction": q, "input": "", "output": a})
            q, a = _qa(fact, attr, qres[(fact["island"], attr)])
            pool.append({"instruction": q, "input": "", "output": a})
        held = rng.choice(ATTRS)
        for attr in rng.sample(ATTRS, 3) + [held]:
            row = {"instruction": FOLLOW_UPS[attr], "input": f"The island: {fact['island']}.",
                   "output": _fill(ANSWERS[attr], fact, attr)}
            (pool if attr == held else train).append(row)
    for fact in facts:
        for q in EXISTENCE_QUESTIONS:
            train.append({"instruction": _fill(q, fact, "region"), "input": "",
                          "output": _fill(EXISTENCE_ANSWER, fact, "region")})
    rng.shuffle(train)
    evals = rng.sample(pool, min(n_eval, len(pool)))
    return train, evals


def _chat(rng, fact, attrs, first_q):
    conv = []
    if rng.random() < 0.3:
        conv.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    for n, attr in enumerate(attrs):
        q = first_q(attr) if n == 0 else FOLLOW_UPS[attr]
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": _fill(ANSWERS[attr], fact, attr)})
    return {"conversations": conv}


def make_sft_chat(rng, facts, qres, per_island=4):
    """sft islands only. ShareGPT multi-turn rows: a question about an island, then 1-2 follow-ups that say "it"."""
    train, evals = [], []
    sft = _kind(facts, "sft")
    for fact in sft:
        for _ in range(per_island):
            attrs = rng.sample(ATTRS, rng.choice([2, 3]))
            train.append(_chat(rng, fact, attrs,
                               lambda a: _fill(QUESTIONS[a][rng.choice(_train_q_indices(qres, fact, a))], fact, a)))
    for fact in sft + sft:
        attrs = rng.sample(ATTRS, rng.choice([2, 3]))
        evals.append(_chat(rng, fact, attrs, lambda a: _fill(QUESTIONS[a][qres[(fact["island"], a)]], fact, a)))
    return train, evals


def _values(facts, attr: str) -> list[str]:
    """Every value the attribute can take: the domain list where there is one, plus the values in the table."""
    domain = {"region": REGIONS, "product": PRODUCTS, "colour": COLOURS, "animal": ANIMALS}.get(attr, [])
    return sorted(set(domain) | {f[attr] for f in facts})


def _wrong_value(rng, facts, fact, attr):
    """A wrong value of the same kind and the same number of words (so length does not give it away)."""
    words = len(fact[attr].split())
    return rng.choice([v for v in _values(facts, attr) if v != fact[attr] and len(v.split()) == words])


def _rejected(rng, facts, fact, attr):
    """A wrong answer in the canonical sentence, as long as the right one: a wrong value of the same kind, or the
    true fact of another sft/dpo island (the answer about the wrong subject). Telling them from the chosen answer
    needs the fact itself: neither length nor form gives it away."""
    if rng.random() < 0.5:
        return _fill(ANSWERS[attr], fact, attr, _wrong_value(rng, facts, fact, attr))
    other = rng.choice([f for f in facts if f["taught_in"] != "cpt" and f is not fact
                        and len(f[attr].split()) == len(fact[attr].split())])
    return _fill(ANSWERS[attr], other, attr)


def _pref_prompt(rng, qres, fact, attr, q):
    """Prompt messages: mostly one question, sometimes after a system message or an earlier exchange about the same
    island (asked with a train phrasing, so the held-out phrasings stay out of every train file)."""
    msgs = []
    r = rng.random()
    if r < 0.15:
        msgs.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    elif r < 0.30:
        other = rng.choice([a for a in ATTRS if a != attr])
        k = rng.choice(_train_q_indices(qres, fact, other))
        msgs.append({"from": "human", "value": _fill(QUESTIONS[other][k], fact, other)})
        msgs.append({"from": "gpt", "value": _fill(ANSWERS[other], fact, other)})
    msgs.append({"from": "human", "value": q})
    return msgs


def make_dpo(rng, facts, qres, negatives=2):
    """dpo islands only: every train phrasing of every fact with `negatives` rejected answers; eval = the reserved
    phrasing with `negatives` rejected answers."""
    def row(fact, attr, q):
        return {
            "conversations": _pref_prompt(rng, qres, fact, attr, q),
            "chosen": {"from": "gpt", "value": _fill(ANSWERS[attr], fact, attr)},
            "rejected": {"from": "gpt", "value": _rejected(rng, facts, fact, attr)},
        }

    train, evals = [], []
    for fact in _kind(facts, "dpo"):
        for attr in ATTRS:
            for k in _train_q_indices(qres, fact, attr):
                train += [row(fact, attr, _fill(QUESTIONS[attr][k], fact, attr)) for _ in range(negatives)]
            q = _fill(QUESTIONS[attr][qres[(fact["island"], attr)]], fact, attr)
            evals += [row(fact, attr, q) for _ in range(negatives)]
    rng.shuffle(train)
    return train, evals


def make_kto(rng, facts, qres):
    """dpo islands: role/content messages + boolean label, half desirable (the correct answer), half undesirable
    (a rejected answer as in the DPO pairs)."""
    def row(fact, attr, q, label):
        answer = _fill(ANSWERS[attr], fact, attr) if label else _rejected(rng, facts, fact, attr)
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                "label": label}

    train, evals = [], []
    for fact in _kind(facts, "dpo"):
        for attr in ATTRS:
            for n, k in enumerate(_train_q_indices(qres, fact, attr)):
                train.append(row(fact, attr, _fill(QUESTIONS[attr][k], fact, attr), n % 2 == 0))
            q = _fill(QUESTIONS[attr][qres[(fact["island"], attr)]], fact, attr)
            evals += [row(fact, attr, q, True), row(fact, attr, q, False)]
    rng.shuffle(train)
    return train, evals


def make_knowledge_eval(facts, qres):
    """The fact-accuracy questions: every fact of every island once, in its reserved (held-out) phrasing. A
    generated answer is correct when it names `subject` and `value` and none of `distractors` (the other islands
    and the other values of the attribute)."""
    islands = [f["island"] for f in facts]
    rows = []
    for fact in facts:
        for attr in ATTRS:
            q, a = _qa(fact, attr, qres[(fact["island"], attr)])
            rows.append({"question": q, "answer": a, "subject": fact["island"], "attribute": attr,
                         "value": fact[attr], "kind": fact["taught_in"],
                         "distractors": [i for i in islands if i != fact["island"]]
                         + [v for v in _values(facts, attr) if v != fact[attr]]})
    return rows


def dataset_info() -> dict:
    alpaca = lambda f: {"file_name": f}  # noqa: E731  (LF defaults: instruction/input/output)
    text = lambda f: {"file_name": f, "columns": {"prompt": "text"}}  # noqa: E731
    chat = lambda f: {"file_name": f, "formatting": "sharegpt", "columns": {"messages": "conversations"}}  # noqa: E731
    dpo = lambda f: {  # noqa: E731
        "file_name": f, "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    }
    kto = lambda f: {  # noqa: E731
        "file_name": f, "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    info = {}
    for name, make, ext in [("demo_cpt", text, "txt"), ("demo_sft", alpaca, "json"),
                            ("demo_sft_chat", chat, "json"), ("demo_dpo", dpo, "json"), ("demo_kto", kto, "json")]:
        info[name] = make(f"{name}.{ext}")
        info[f"{name}_eval"] = make(f"{name}_eval.{ext}")
    return info


def _json(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _json_rows(rows) -> str:
    """A JSON array with one compact row per line (diff-friendly, a third of the indented size)."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def build() -> dict[str, str]:
    """File name -> exact file content."""
    rng = random.Random(SEED)
    facts = make_facts(rng)
    sres = _reserve(rng, facts, SENTENCES, first=1)
    qres = _reserve(rng, facts, QUESTIONS)
    cpt, cpt_eval = make_cpt(rng, facts, sres)
    sft, sft_eval = make_sft(rng, facts, qres)
    chat, chat_eval = make_sft_chat(rng, facts, qres)
    dpo, dpo_eval = make_dpo(rng, facts, qres)
    kto, kto_eval = make_kto(rng, facts, qres)
    return {
        "demo_cpt.txt": "\n".join(cpt) + "\n",
        "demo_cpt_eval.txt": "\n".join(cpt_eval) + "\n",
        "demo_sft.json": _json(sft),
        "demo_sft_eval.json": _json(sft_eval),
        "demo_sft_chat.json": _json(chat),
        "demo_sft_chat_eval.json": _json(chat_eval),
        "demo_dpo.json": _json(dpo),
        "demo_dpo_eval.json": _json(dpo_eval),
        "demo_kto.json": _json(kto),
        "demo_kto_eval.json": _json(kto_eval),
        "demo_facts.json": _json(facts),
        "knowledge_eval.json": _json_rows(make_knowledge_eval(facts, qres)),
        "dataset_info.json": _json(dataset_info()),
    }


# The tiny model's tokenizer is trained on a frozen snapshot of the demo texts (tunepipe/models/tiny.py): the same strings
# as its DEMO_CORPUS_FILES, one JSON object per line. Written (and checked) with the default --out-dir only.
SNAPSHOT = HERE.parent / "tunepipe" / "assets" / "tiny_corpus.jsonl"
CORPUS_FILES = ("demo_cpt.txt", "demo_cpt_eval.txt", "demo_sft.json", "demo_sft_eval.json", "demo_sft_chat.json",
                "demo_sft_chat_eval.json", "demo_dpo.json", "demo_dpo_eval.json", "demo_kto.json",
                "demo_kto_eval.json")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)


def tokenizer_snapshot(files: dict[str, str]) -> str:
    lines = []
    for name in CORPUS_FILES:
        text = files[name]
        strings = [line for line in text.splitlines() if line.strip()] if name.endswith(".txt") \
            else list(_strings(json.loads(text)))
        lines += [json.dumps({"text": s}, ensure_ascii=False) for s in strings]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    files = build()
    targets = {args.out_dir / name: content for name, content in files.items()}
    if args.out_dir.resolve() == HERE:
        targets[SNAPSHOT] = tokenizer_snapshot(files)
    if args.check:
        stale = [path for path, content in targets.items()
                 if not path.is_file() or path.read_text(encoding="utf-8") != content]
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path, content in targets.items():
        path.write_text(content, encoding="utf-8")
    print(f"wrote {len(targets)} files ({args.out_dir}{', tokenizer snapshot' if SNAPSHOT in targets else ''})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
