"""Captions: the caption filter (captions -> soft pseudo labels + co-occurrence graph) and the
BLIP-2 captioner for datasets published without captions.

Built on the data layer (`data.py`), which never imports this module; nothing here imports the model.

CLI:
  python captions.py pseudo-labels --dataset voc2007 --captions DIR --out scores.csv \
      [--synonyms FILE.json|paper] [--graph graph.safetensors]
  python captions.py generate --dataset coco2014|...|folder --data-root ROOT [--split SPLIT] \
      --model BLIP2_DIR --out DIR          # needs the optional extra: requirements-captions.txt
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

import config
import metrics
import registry
from cli import DefaultsHelp, check_outputs_apart, integer_from, run_command
from data import (
    DataError,
    MultiLabelImages,
    SkipReport,
    atomic_write,
    check_writable,
    image_batches,
    image_folder,
    read_json,
    shown_path,
    write_graph,
    write_scores_csv,
)

ROOT = Path(__file__).resolve().parent
FOLDER = "folder"      # `generate --dataset folder`: every JPEG/PNG under --data-root, no dataset

# ============================================================================================
# Caption filter: captions -> soft pseudo labels over O = C classes + B backgrounds
# ============================================================================================

# Irregular plurals seen in captions. Regular ones go through `singularize`'s rules.
IRREGULAR_PLURALS = {
    "people": "person", "persons": "person", "men": "man", "women": "woman",
    "children": "child", "kids": "kid", "mice": "mouse", "geese": "goose", "feet": "foot",
    "teeth": "tooth", "oxen": "ox", "knives": "knife", "wives": "wife", "lives": "life",
    "leaves": "leaf", "wolves": "wolf", "shelves": "shelf", "calves": "calf",
    "halves": "half", "loaves": "loaf", "scarves": "scarf", "thieves": "thief",
    "buses": "bus", "busses": "bus", "gases": "gas", "lenses": "lens", "cacti": "cactus",
    "fungi": "fungus", "octopi": "octopus", "indices": "index", "matrices": "matrix",
    "dice": "die", "ponies": "pony", "puppies": "puppy", "skies": "sky",
}
# Words that end in "s" but are singular (or uncountable) and must never lose it.
SINGULAR_S = {
    "bus", "gas", "lens", "glass", "grass", "class", "dress", "cross", "boss", "moss", "chess",
    "news", "species", "series", "canvas", "atlas", "alias", "christmas", "walrus", "cactus",
    "octopus", "hippopotamus", "rhinoceros", "citrus", "campus", "circus", "status", "virus",
    "chassis", "swiss", "texas", "paris", "always", "perhaps", "various", "is", "was", "has",
    "does", "this", "his", "its", "us", "yes", "plus", "thus", "across", "towards", "afterwards",
    "sheep", "fish", "deer", "aircraft", "scissors", "skis", "pants", "jeans", "trousers",
    "glasses", "sunglasses", "binoculars", "clothes", "sports", "physics", "mathematics",
    "tennis", "analysis", "basis", "crisis", "axis", "oasis", "iris", "bonus", "hummus",
    "asparagus", "hibiscus", "lotus", "lettuce",
}


def singularize(word: str, vocabulary: frozenset[str] | set[str] = frozenset()) -> str:
    """Singular form of one lower-case token.

    With a `vocabulary` (the singular words of the synonym dictionary), a token that *is* a
    vocabulary word is never touched ("bus" stays "bus") and a plural is mapped to the first
    rule candidate that is in the vocabulary ("buses" -> "bus", "horses" -> "horse",
    "glasses" -> "glass"). Without a match the plain rules apply, which is safe because
    only vocabulary words are ever matched downstream.
    """
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in vocabulary or len(word) <= 3 or not word.endswith("s"):
        return word
    candidates = [word[:-1]]  # horses -> horse
    if word.endswith("es"):
        candidates.append(word[:-2])  # boxes -> box, glasses -> glass
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")  # ponies -> pony
    for cand in candidates:
        if cand in vocabulary:
            return cand
    if word in SINGULAR_S or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


# Fragments that name a class without claiming it is in the picture. The re-captions were
# partly conditioned on classes already found ("What objects are present in this image,
# excluding car?") and the model often echoes that condition; counting the echo would vote
# for the condition, not for the picture. Each match is cut up to the next punctuation mark.
_ECHO_RE = re.compile(
    r"\b(?:excluding|exclude|excluded|except(?: for)?|other than|apart from|aside from|"
    r"besides|not including|without)\b[^,.;:?!\"()]*"
)
# "Question: ... Answer: ..." loops repeat the prompt; the question part names nothing seen.
_QUESTION_RE = re.compile(r"\bquestion\s*:[^?]*\??")
_NON_WORD_RE = re.compile(r"[^a-z0-9]+")


def normalize_text(text: str) -> str:
    """Lower case, accents folded to ASCII, prompt echoes removed, punctuation to spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = text.replace("'s ", " ").replace("-", " ")
    text = _QUESTION_RE.sub(" ", text)
    text = _ECHO_RE.sub(" ", text)
    return _NON_WORD_RE.sub(" ", text).strip()


def tokenize(text: str, vocabulary: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Normalised, singularised tokens of one caption."""
    return [singularize(w, vocabulary) for w in normalize_text(text).split()]


IGNORE_KEY = "__ignore__"
# Function words: a synonym that is only these (or single letters) would name its category in
# nearly every caption ("a photo of the ..."). Pronouns are not among them: "he", "she" name a person.
STOPWORDS = frozenset(
    "a an the and or but nor of on in at to by for from with into onto over under up down out off near than "
    "as is are was were be been being it its this that these those there here some any so not no".split())


def meaningless_phrase(tokens: Sequence[str]) -> str | None:
    """What a dictionary phrase's normalised tokens reduce to when they cannot name a category
    ('nothing', a single letter, a stopword), or None for a phrase that can."""
    if not tokens:
        return "nothing"
    if all(len(t) == 1 or t in STOPWORDS for t in tokens):
        words = " ".join(tokens)
        return (f"the single letter {words!r}" if len(words) == 1 else f"the stopword {words!r}" if len(tokens) == 1
                else f"stopwords and single letters only ({words!r})")
    return None


@dataclass
class SynonymDictionary:
    """Categories (C classes first, then B backgrounds) and the phrases that name them.

    A phrase may name several categories ("cyclist" -> bicycle and person) or none: phrases
    under the reserved key `__ignore__` are consumed by the matcher and vote for nothing, so
    "hot dog" never votes for dog and "bus stop" never for bus.
    """

    categories: list[str]
    num_classes: int
    phrases: dict[tuple[str, ...], tuple[int, ...]]
    vocabulary: frozenset[str]
    source: str = ""
    max_len: int = field(init=False)

    def __post_init__(self):
        self.max_len = max((len(p) for p in self.phrases), default=1)

    @classmethod
    def from_json(cls, path: str | os.PathLike, num_classes: int) -> "SynonymDictionary":
        return cls.from_mapping(_read_dictionary(path), num_classes, path)

    @classmethod
    def for_classes(cls, classes: Sequence[str], extra: str | os.PathLike = "") -> "SynonymDictionary":
        """A dictionary for a user's own class names: each class named by itself (plurals are
        singularised as in captions), then the project's background categories (sky, road, grass,
        ...: BACKGROUNDS_FROM), and what `extra` (a dictionary JSON) adds to any of them."""
        source, after = BACKGROUNDS_FROM
        base = list(_read_dictionary(registry.SYNONYM_DIR / source).items())[after:]
        raw = {c: [c] for c in classes}
        taken = {c.lower() for c in classes}
        raw.update({b: syns for b, syns in base if b != IGNORE_KEY and b.lower() not in taken})
        if extra:
            for category, synonyms in _read_dictionary(extra).items():
                if category != IGNORE_KEY and category not in raw:
                    raise DataError(extra, f"names the category {category!r}, which is neither one of the classes "
                                           f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}) nor a "
                                           "background category")
                raw.setdefault(category, []).extend(synonyms)
        return cls.from_mapping(raw, len(classes), extra or f"the class names + {source}'s backgrounds")

    @classmethod
    def from_mapping(cls, raw: dict[str, list[str]], num_classes: int,
                     path: str | os.PathLike) -> "SynonymDictionary":
        """`path`: where the mapping comes from (errors name it)."""
        path = Path(path)
        raw = dict(raw)
        ignore = raw.pop(IGNORE_KEY, [])
        categories = [k.strip() for k in raw]
        if len(categories) < num_classes:
            raise DataError(path, f"has {len(categories)} categories, the dataset has {num_classes} classes")
        # Singular vocabulary first, so that dictionary phrases and caption tokens are
        # singularised by the very same function.
        raw_words = {w for syns in [*raw.values(), ignore] for s in syns for w in normalize_text(s).split()}
        vocabulary = frozenset(singularize(w) for w in raw_words)
        phrases: dict[tuple[str, ...], set[int]] = {}
        for idx, syns in enumerate(raw.values()):
            for s in syns:
                key = tuple(tokenize(s, vocabulary))
                meaningless = meaningless_phrase(key)
                if meaningless:      # ("(a+)+$" is the word "a": every caption would name the category)
                    raise DataError(path, f"synonym {s!r} of {categories[idx]!r} normalises to {meaningless}, "
                                          "which names no category: remove it or spell the phrase out")
                phrases.setdefault(key, set()).add(idx)
        for s in ignore:
            key = tuple(tokenize(s, vocabulary))
            if key and key not in phrases:
                phrases[key] = set()
        return cls(categories, num_classes,
                   {k: tuple(sorted(v)) for k, v in phrases.items()}, vocabulary, str(path))

    def match(self, caption: str) -> set[int]:
        """Categories named in one caption: longest phrases first, spans never overlap."""
        tokens = tokenize(caption, self.vocabulary)
        used = [False] * len(tokens)
        found: set[int] = set()
        for n in range(min(self.max_len, len(tokens)), 0, -1):
            for i in range(len(tokens) - n + 1):
                if any(used[i:i + n]):
                    continue
                cats = self.phrases.get(tuple(tokens[i:i + n]))
                if cats is not None:
                    used[i:i + n] = [True] * n
                    found.update(cats)
        return found


# A folder of photos borrows the background categories of the project's VOC dictionary, where they
# follow VOC's 20 classes.
BACKGROUNDS_FROM = ("voc2007.json", 20)


def _read_dictionary(path: str | os.PathLike) -> dict[str, list[str]]:
    raw = read_json(path, "synonym dictionary")
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in raw.values()
    ):
        raise DataError(path, "expected an object {category: [synonym, ...]}")
    return raw


class _KeyValuePairs(list):
    """A JSON object as its (key, value) pairs in file order, a key given twice included."""


# The authors' repository publishes its captions as caption/<dataset>/<dataset>_captions.json and
# <dataset>_re_captions.json; this project (and `captions.py generate`) writes captions.json and
# re_captions.json. A captions folder may be either, or the repository's caption/ folder, or a clone.
CAPTIONS_FILE, RE_CAPTIONS_FILE = "captions.json", "re_captions.json"
CAPTION_FILES = (CAPTIONS_FILE, RE_CAPTIONS_FILE)     # a captions folder's own files (the second optional)
AUTHORS_CAPTION_FOLDER = "caption"


def caption_candidates(folder: str | os.PathLike, dataset: str = "") -> list[Path]:
    """Where the captions of `dataset` may be in `folder`, in the order they are looked for."""
    folder = Path(folder)
    found = [folder / CAPTIONS_FILE]
    if dataset:
        own = f"{dataset}_{CAPTIONS_FILE}"
        found += [folder / own, folder / dataset / own, folder / AUTHORS_CAPTION_FOLDER / dataset / own]
    return found


def find_captions(folder: str | os.PathLike, dataset: str = "") -> Path | None:
    """The captions file of `dataset` in `folder` (any layout of `caption_candidates`), or None."""
    return next((p for p in caption_candidates(folder, dataset) if p.is_file()), None)


def re_captions_beside(main: Path) -> Path:
    """captions.json -> re_captions.json; voc2007_captions.json -> voc2007_re_captions.json."""
    return main.with_name(main.name[:-len(CAPTIONS_FILE)] + RE_CAPTIONS_FILE)


def read_captions(directory: str | os.PathLike, dataset: str = "") -> dict[str, list[str]]:
    """The captions (+ re-captions where present) of `directory` -> {image id: [caption, ...]}:
    captions.json, or the authors' files as published (`<dataset>_captions.json`, in the folder,
    its `<dataset>/`, or a clone's `caption/<dataset>/`).

    Ids lose the trailing dot of the official files ("000012." -> "000012"). An id twice in one
    file (the same key twice, or "000012." beside "000012") is refused: merged or dropped, its
    captions would change the votes unseen. A captions file naming no image is refused too.
    """
    main = find_captions(directory, dataset)
    if main is None:
        looked = ", ".join(shown_path(p.relative_to(directory)) for p in caption_candidates(directory, dataset))
        raise DataError(directory, f"captions file not found (looked for {looked})")
    out: dict[str, list[str]] = {}
    for path in (main, re_captions_beside(main)):
        if not path.is_file():
            continue
        raw = read_json(path, "captions file", object_pairs_hook=_KeyValuePairs)     # duplicates kept
        if not isinstance(raw, _KeyValuePairs):
            raise DataError(path, "expected an object {image_id: [caption, ...]}")
        seen: dict[str, str] = {}
        for key, caps in raw:
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataError(path, f"entry {key!r} is not a list of strings")
            image_id = key.rstrip(".")
            if image_id in seen:
                raise DataError(path, f"image id {image_id!r} appears more than once (keys {seen[image_id]!r} "
                                      f"and {key!r})")
            seen[image_id] = key
            out.setdefault(image_id, []).extend(caps)
        if path == main and not seen:
            raise DataError(path, "names no image (an empty object)")
    return out


@dataclass
class CaptionFilterConfig:
    # A hard pseudo label needs at least this many captions naming the category (paper: m).
    min_votes: int = 1
    # Weight of the caption-context score that orders images with equal vote counts. Vote
    # fractions over 12 captions take only 13 values, so hundreds of images tie, and ~1/4 of
    # the true positives of chair/bottle/potted plant get no vote at all. A Bernoulli naive
    # Bayes over all caption words, fit on the hard pseudo labels themselves (no human label),
    # says which of the tied images are likelier ("living room", "window" for potted plant).
    # Kept below 1/(2 * captions) so it reorders ties and never outranks a single vote.
    # VOC2007 dev (2,500 images), our dictionary: mAP 84.1 -> 88.2, best F1 0.845 -> 0.848;
    # the paper's dictionary: 78.5 -> 85.4 (bench/caption_table.py). 0 turns it off (plain vote fraction).
    context_weight: float = 1e-3
    # Words in fewer images than this are left out of the context model (noise, names).
    context_min_images: int = 3
    # Laplace smoothing of the context model's word probabilities.
    context_smoothing: float = 1.0


@dataclass
class PseudoLabels:
    ids: list[str]
    categories: list[str]       # C classes (dataset spelling) then B backgrounds
    num_classes: int
    scores: np.ndarray          # [n, O] soft labels in [0, 1]: vote fraction (+ context tie-break)
    votes: np.ndarray           # [n, O] number of captions naming each category
    num_captions: np.ndarray    # [n] captions per image

    def hard(self, min_votes: int = 1) -> np.ndarray:
        """0/1 labels [n, O]: at least `min_votes` captions name the category."""
        return (self.votes >= min_votes).astype(np.float32)


def _context_scores(token_sets: list[list[str]], hard: np.ndarray,
                    config: CaptionFilterConfig) -> np.ndarray:
    """Context score [n, O] in [0, 1]: per category, the rank of P(category | caption words)
    under a Bernoulli naive Bayes fit on the `hard` pseudo labels, scaled to [0, 1]."""
    import torch

    df = Counter(w for words in token_sets for w in words)
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= config.context_min_images))}
    rows, cols = [], []
    for r, words in enumerate(token_sets):
        for w in words:
            if w in vocab:
                rows.append(r)
                cols.append(vocab[w])
    n, num_words = len(token_sets), max(len(vocab), 1)
    x = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                torch.ones(len(rows), dtype=torch.float64), (n, num_words),
                                check_invariants=True).coalesce()
    y = torch.from_numpy(hard.astype(np.float64))
    a = config.context_smoothing
    n_pos = y.sum(0)
    n_neg = n - n_pos
    with_word = torch.sparse.mm(x.t(), y)                       # [W, O] positives having word
    p1 = (with_word + a) / (n_pos + 2 * a)
    p0 = (torch.sparse.sum(x, 0).to_dense()[:, None] - with_word + a) / (n_neg + 2 * a)
    present = torch.log(p1 / p0)
    absent = torch.log((1 - p1) / (1 - p0))
    logit = (torch.sparse.mm(x, present - absent) + absent.sum(0)
             + torch.log((n_pos + a) / (n_neg + a))).numpy()
    # Naive Bayes is overconfident: its probabilities sit within 1e-12 of 0 or 1, where a
    # CSV (or float32) loses the order. Its ranks keep the order at any precision.
    ranks = np.argsort(np.argsort(logit, axis=0, kind="stable"), axis=0, kind="stable")
    return ranks / max(n - 1, 1)


def pseudo_labels(captions: dict[str, list[str]], dictionary: SynonymDictionary,
                  class_names: Sequence[str] | None = None,
                  config: CaptionFilterConfig = CaptionFilterConfig(),
                  ids: Sequence[str] | None = None, progress: bool = False) -> PseudoLabels:
    """The 4-step caption filter over every image: soft and hard labels over O categories.

    Steps 1-3 (normalise, phrases longest first, dictionary without overlaps) are
    `SynonymDictionary.match`; step 4 votes across captions: the soft label of o is the
    fraction of captions naming it, ties ordered by the caption-context model.
    """
    ids = list(captions) if ids is None else list(ids)
    num_cats = len(dictionary.categories)
    votes = np.zeros((len(ids), num_cats), dtype=np.float64)
    num_captions = np.zeros(len(ids), dtype=np.int64)
    token_sets: list[list[str]] = []
    iterator = ids
    if progress:
        from tqdm import tqdm
        iterator = tqdm(ids, desc="captions", unit="img", file=sys.stderr)
    for row, image_id in enumerate(iterator):
        caps = captions.get(image_id, [])
        num_captions[row] = len(caps)
        words: set[str] = set()
        for cap in caps:
            for c in dictionary.match(cap):
                votes[row, c] += 1
            if config.context_weight > 0:
                words.update(tokenize(cap, dictionary.vocabulary))
        token_sets.append(sorted(words))
    scores = votes / np.maximum(num_captions, 1)[:, None]
    if config.context_weight > 0 and len(ids) > 0:
        hard = (votes >= config.min_votes).astype(np.float64)
        context = _context_scores(token_sets, hard, config)
        scores = (scores + config.context_weight * context) / (1.0 + config.context_weight)
        scores[num_captions == 0] = 0.0
    categories = list(dictionary.categories)
    if class_names is not None:
        categories[:len(class_names)] = list(class_names)
    return PseudoLabels(ids, categories, dictionary.num_classes, scores, votes, num_captions)


def with_true_labels(pseudo: PseudoLabels, train_ds: MultiLabelImages, min_votes: int) -> PseudoLabels:
    """The oracle's labels: the dataset's human labels in place of what the captions say of the
    C classes, as soft targets and hard labels (so the graph and ReSO see them too). Background
    categories have no human labels and keep the captions'."""
    positive = train_ds.labels_for(pseudo.ids) == 1
    c = pseudo.num_classes
    scores, votes = pseudo.scores.copy(), pseudo.votes.copy()
    scores[:, :c] = positive
    votes[:, :c] = np.where(positive, max(min_votes, 1), 0)
    return replace(pseudo, scores=scores, votes=votes)


def label_quality(scores: np.ndarray, hard: np.ndarray, labels: np.ndarray,
                  largest_area: np.ndarray | None = None, size_rule: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Pseudo labels against human labels [n, C] (1 / -1 / 0 difficult, ignored): the soft
    `scores`' mAP, the `hard` labels' pooled precision and recall, and, where `largest_area`
    [n, C] (the largest instance of each class, a fraction of the image) is known, the recall of
    small (< size_rule[0]) and large (>= size_rule[1]) instances."""
    small, large = size_rule
    positive, negative, said = labels == 1, labels == -1, hard > 0
    hits = (said & positive).sum()
    out = {"mAP": metrics.mean_ap(scores, labels),
           "precision": float(hits / max((said & (positive | negative)).sum(), 1)),
           "recall": float(hits / max(positive.sum(), 1))}
    if largest_area is not None:
        for name, band in (("recall_small", positive & (largest_area < small)),
                           ("recall_large", positive & (largest_area >= large))):
            out[name] = float((said & band).sum() / band.sum()) if band.any() else float("nan")
    return out


def caption_quality(pseudo: PseudoLabels, train_ds: MultiLabelImages, min_votes: int = 1,
                    largest_area: np.ndarray | None = None, size_rule: tuple[float, float] = (0.0, 1.0)) -> dict:
    """How well the caption pseudo labels (soft, and hard at `min_votes`) match the training
    images' human labels over the C classes: `label_quality`'s figures and the best pooled F1;
    {} where the split has no positive label to rank."""
    labels = train_ds.labels_for(pseudo.ids)
    if not metrics.positive_counts(labels).any():
        return {}
    c = pseudo.num_classes
    scores = pseudo.scores[:, :c]
    quality = label_quality(scores, pseudo.hard(min_votes)[:, :c], labels, largest_area, size_rule)
    return {**quality, "best_F1": metrics.best_f1(scores, labels)[0]}


# ============================================================================================
# A run's dictionary and a photo folder's captions
# ============================================================================================

def photo_captions_folder(cfg: config.BACGCNConfig) -> Path:
    """Where a folder of photos keeps the captions made for it: beside the feature cache, one
    folder per photo folder (its name and a digest of its path), so a later run captions only
    the photos added since."""
    import hashlib

    root = Path(cfg.data_root).resolve()
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir or config.default_cache_dir(cfg)).resolve().parent / "captions" / f"{root.name}-{tag}"


def dictionary_for(cfg: config.BACGCNConfig, classes: Sequence[str]) -> SynonymDictionary:
    """The run's synonym dictionary: the dataset's (or --synonyms); for a folder of photos, one
    made from the class names and the backgrounds, which --synonyms=FILE adds to."""
    entry = registry.get(cfg.dataset)
    if entry.own_photos:
        return SynonymDictionary.for_classes(classes, cfg.synonyms)
    return SynonymDictionary.from_json(entry.synonym_file(cfg.synonyms, cfg.captions), len(classes))


# ============================================================================================
# Captioning (optional extra: transformers): BLIP-2 captions for datasets published without them
# ============================================================================================
# The six BLIP-2 prompts, one per caption slot. The paper does not print them; they are read off
# its released VOC captions, where BLIP-2 sometimes runs on into "Question: ... Answer: ..." loops
# that repeat its own prompt. In captions.json slots 0, 1, 3 and 5 echo "What is in the photo?",
# "What are shown in the photo?", "What objects are present in this image?" and "What is the
# background of this image?". Slots 2 and 4 echo only in re_captions.json, as "Tell us about the
# photo, excluding car?" and "Please explain this photo in detail, excluding car?"; their answers in
# both files ("This is a photo of ...", "The photo was taken at ...") fit those requests.
CAPTION_PROMPTS = (
    "What is in the photo?",
    "What are shown in the photo?",
    "Tell us about the photo.",
    "What objects are present in this image?",
    "Please explain this photo in detail.",
    "What is the background of this image?",
)
# The wrapping the echoes show (BLIP-2's OPT question-answering format).
PROMPT_TEMPLATE = "Question: {} Answer:"
CAPTIONS_INSTALL = "pip install -r requirements-captions.txt"


def recaption_prompts(found: Sequence[str]) -> list[str]:
    """Second-pass prompts: each first-pass prompt, excluding the categories already found.

    The echoes show the found names joined by spaces ("excluding aeroplane sky?"), which also
    keeps the whole list inside one clause for the caption filter's echo removal. With nothing
    found the plain prompt is asked (the released files then show a bare "excluding?").
    """
    if not found:
        return [PROMPT_TEMPLATE.format(p) for p in CAPTION_PROMPTS]
    names = " ".join(found)
    return [PROMPT_TEMPLATE.format(f"{p.rstrip('?.')}, excluding {names}?") for p in CAPTION_PROMPTS]


def found_categories(captions: Sequence[str], dictionary: SynonymDictionary, names: Sequence[str]) -> list[str]:
    """Names of the categories (classes and backgrounds) that any of the captions names."""
    found = set().union(*(dictionary.match(c) for c in captions))
    return [names[c] for c in sorted(found)]



class _BlipPreprocess:
    """uint8 [3, H, W] -> the model's pixel values [3, h, w], run in the loader's workers."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise DataError("transformers", f"not installed; captions need the optional extra: {CAPTIONS_INSTALL}") \
            from None
    return transformers


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def load_blip2(spec: str | os.PathLike, device: str):
    """(model, processor) of BLIP-2: a local folder (save_pretrained layout), or a Hugging Face hub
    id (`Salesforce/blip2-opt-2.7b`) fetched once into the hub's cache, with a progress bar.
    bf16 on CUDA, fp32 on the CPU (bf16 is many times slower there)."""
    import torch

    transformers = _import_transformers()
    path = Path(spec)
    local = path.is_dir()
    if local:
        if not (path / "config.json").is_file():
            raise DataError(path, "no config.json here: not a model folder written by save_pretrained")
        config = read_json(path / "config.json", "model config")
    elif HUB_ID.fullmatch(str(spec)) and not path.exists():
        try:
            config = transformers.AutoConfig.from_pretrained(str(spec)).to_dict()
        except (OSError, ValueError) as e:
            raise DataError(str(spec), "not a local model folder, and not loadable from the Hugging Face hub "
                                       f"({_first_line(e)})") from None
    else:
        raise DataError(path, "model folder not found (nor a Hugging Face hub id such as Salesforce/blip2-opt-2.7b)")
    if not isinstance(config, dict) or config.get("model_type") != "blip-2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise DataError(path, f"not a BLIP-2 model (model_type {kind!r}, expected 'blip-2')")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        processor = transformers.Blip2Processor.from_pretrained(str(spec), local_files_only=local)
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(str(spec), local_files_only=local,
                                                                           dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(path, f"cannot load the BLIP-2 model ({_first_line(e)})") from None
    # Prompts of a batch differ in length; a decoder-only model continues from the right end.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model.to(device).eval(), processor


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _image_features(model, pixel_values):
    """The language-model inputs of the images [B, queries, d] (vision tower + Q-Former + projection)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return getattr(out, "pooler_output", out)


def _generate(model, tokenizer, features, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `prompts`, one per row of `features`. Equal to BLIP-2's own `generate`
    (the test checks it), but the image features come in precomputed, so that each image is
    encoded once for its 12 prompts instead of 12 times."""
    import torch

    enc = tokenizer(list(prompts), padding=True, return_tensors="pt").to(features.device)
    embeds = model.get_input_embeddings()(enc["input_ids"])
    inputs = torch.cat([features.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([enc["attention_mask"].new_ones(features.shape[:2]), enc["attention_mask"]], dim=1)
    out = model.language_model.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, num_beams=1)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def _caption_images(model, tokenizer, features, prompts: list[list[str]], max_new_tokens: int) -> list[list[str]]:
    """prompts[i] asked about image i (features[i]); one generate call for the whole batch."""
    import torch

    counts = torch.tensor([len(p) for p in prompts], device=features.device)
    answers = _generate(model, tokenizer, features.repeat_interleave(counts, dim=0),
                        [p for ps in prompts for p in ps], max_new_tokens)
    out, start = [], 0
    for ps in prompts:
        out.append(answers[start:start + len(ps)])
        start += len(ps)
    return out


class CaptionProgress:
    """Captions written so far, keyed like the paper's files ("000012."). `save` writes both passes
    to one partial file atomically, so a killed run resumes from its last save and never holds a
    re-caption without its captions; `finish` writes captions.json (+ re_captions.json)."""

    def __init__(self, out: str | os.PathLike, recaption: bool):
        self.out, self.recaption = Path(out), recaption
        self.partial = self.out / "captions.partial.json"
        self.files = {"captions": {}, "re_captions": {}}
        for name, entries in self.files.items():
            path = self.out / f"{name}.json"
            if path.is_file():
                entries.update(self._entries(path, read_json(path, "captions file")))
        if self.partial.is_file():
            raw = read_json(self.partial, "partial captions file")
            for name, entries in self.files.items():
                entries.update(self._entries(self.partial, raw.get(name, {}) if isinstance(raw, dict) else None))

    @staticmethod
    def _entries(path: Path, raw) -> dict[str, list[str]]:
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise DataError(path, "expected an object {image_id: [caption, ...]}; delete it or choose another --out")
        return raw

    def done(self, image_id: str) -> bool:
        key = image_id + "."
        return key in self.files["captions"] and (not self.recaption or key in self.files["re_captions"])

    def add(self, image_id: str, captions: list[str], re_captions: list[str] | None) -> None:
        self.files["captions"][image_id + "."] = captions
        if re_captions is not None:
            self.files["re_captions"][image_id + "."] = re_captions

    def save(self) -> None:
        atomic_write(self.partial, lambda tmp: tmp.write_text(json.dumps(self.files, ensure_ascii=False), "utf-8"))

    def finish(self) -> list[Path]:
        names = ["captions", "re_captions"] if self.recaption else ["captions"]
        for name in names:
            text = json.dumps(self.files[name], ensure_ascii=False, indent=0)
            atomic_write(self.out / f"{name}.json", lambda tmp, text=text: tmp.write_text(text, "utf-8"))
        self.partial.unlink(missing_ok=True)
        return [self.out / f"{name}.json" for name in names]


def caption_images(images: MultiLabelImages, model, processor, progress: CaptionProgress,
                   dictionary: SynonymDictionary | None = None, batch_size: int = 16, workers: int = 0,
                   max_new_tokens: int = 30, save_every: int = 20, quiet: bool = False) -> tuple[int, SkipReport]:
    """Caption the images `progress` does not hold yet: the six prompts, then (with a dictionary)
    the six re-caption prompts that exclude what the first six named. Saves every `save_every`
    batches and when interrupted. Returns (images captioned, skip report)."""
    import torch
    from tqdm import tqdm

    todo = MultiLabelImages([s for s in images.samples if not progress.done(s.id)], images.class_names,
                            _BlipPreprocess(processor.image_processor), images.name)
    names = [*images.class_names, *dictionary.categories[len(images.class_names):]] if dictionary else []
    device, dtype = model.device, model.dtype
    report, captioned = SkipReport(), 0
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, disable=quiet)
    try:
        with torch.inference_mode():
            for n, batch in enumerate(image_batches(todo, batch_size, workers, device.type == "cuda"), 1):
                report.update(batch)
                if batch["id"]:
                    features = _image_features(model, batch["image"].to(device, dtype, non_blocking=True))
                    first = [[PROMPT_TEMPLATE.format(p) for p in CAPTION_PROMPTS]] * len(batch["id"])
                    caps = _caption_images(model, processor.tokenizer, features, first, max_new_tokens)
                    recaps = [None] * len(caps)
                    if dictionary is not None:
                        second = [recaption_prompts(found_categories(c, dictionary, names)) for c in caps]
                        recaps = _caption_images(model, processor.tokenizer, features, second, max_new_tokens)
                    for image_id, c, r in zip(batch["id"], caps, recaps):
                        progress.add(image_id, c, r)
                    captioned += len(caps)
                if n % save_every == 0:
                    progress.save()
                bar.update(batch["skipped"] + len(batch["id"]))
    except BaseException:
        progress.save()  # Ctrl-C or a failure mid-run keeps every finished batch
        raise
    finally:
        bar.close()
    return captioned, report


def _caption_source(args: argparse.Namespace) -> tuple[MultiLabelImages, SynonymDictionary | None]:
    """The images to caption and the dictionary that finds classes for re-captions (None: skip them)."""
    if args.dataset == FOLDER:
        images = image_folder(args.data_root)
        if not args.synonyms:
            return images, None
        return images, SynonymDictionary.from_json(Path(args.synonyms), 0)
    entry = registry.get(args.dataset)
    if args.split not in entry.splits:
        given = f"got {args.split!r}" if args.split else "none given"
        raise DataError("--split", f"{entry.name} splits are {', '.join(entry.splits)}; {given}")
    images = entry.load(args.data_root, args.split)
    synonyms = entry.synonym_file(args.synonyms or "", args.data_root)
    return images, SynonymDictionary.from_json(synonyms, len(images.class_names))


@dataclass
class CaptionerOptions:
    """How `generate` runs BLIP-2 (the `captions.py generate` options of the same names)."""
    device: str = ""            # '' = cuda when available
    batch_size: int = 16        # images per batch (each asks 6 + 6 prompts)
    workers: int = 0            # image decoding processes
    max_new_tokens: int = 30    # longest answer, in tokens
    save_every: int = 20        # batches between progress saves
    quiet: bool = False         # no progress bar


def generate(images: MultiLabelImages, model: str, out: str | os.PathLike, dictionary: SynonymDictionary | None,
             options: CaptionerOptions = CaptionerOptions()) -> list[Path]:
    """Caption the images of `images` that `out` does not hold yet with BLIP-2 (`model`: a local
    folder or a hub id) into out/captions.json (+ re_captions.json with a dictionary), resuming
    there. Returns the files written."""
    if not images.samples:
        raise DataError(images.name, "no image to caption")
    progress = CaptionProgress(out, recaption=dictionary is not None)
    left = sum(not progress.done(s.id) for s in images.samples)
    if left:
        import torch

        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"{images.name}: {len(images.samples) - left} of {len(images.samples)} images already captioned, "
              f"{left} to go ({model} on {device})", file=sys.stderr)
        blip2, processor = load_blip2(model, device)
        _, report = caption_images(images, blip2, processor, progress, dictionary, options.batch_size,
                                   options.workers, options.max_new_tokens, options.save_every, options.quiet)
        print(f"{images.name}: {report.summary()}", file=sys.stderr)
        if not progress.files["captions"]:
            raise DataError(images.name, f"none of the {left} images could be read; nothing captioned")
    return progress.finish()


def _cmd_generate(args: argparse.Namespace) -> None:
    _import_transformers()  # before any slow step: a missing extra is the likeliest first error
    images, dictionary = _caption_source(args)
    if not images.samples:
        raise DataError(args.data_root, "no image to caption")
    if dictionary is None:
        print("folder without --synonyms: writing captions.json only (re-captions exclude the categories "
              "a dictionary finds in the first captions)", file=sys.stderr)
    options = CaptionerOptions(args.device or "", args.batch_size, args.workers, args.max_new_tokens,
                               args.save_every, args.quiet)
    for path in generate(images, args.model, args.out, dictionary, options):
        print(f"wrote {path}")


# ============================================================================================
# CLI
# ============================================================================================

def _cmd_pseudo_labels(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")                 # every output before any work
    if args.graph:
        check_writable(args.graph, "--graph")
    entry = registry.get(args.dataset)
    synonyms = entry.synonym_file(args.synonyms or "", args.captions)
    found = find_captions(args.captions, entry.name)
    check_outputs_apart([("--out", args.out), ("--graph", args.graph)],
                        [*(("--captions", p) for p in ((found, re_captions_beside(found)) if found else ())),
                         ("--synonyms", synonyms)])
    class_names = entry.class_names(args.captions)     # a dataset without a class list carries it beside its captions
    dictionary = SynonymDictionary.from_json(synonyms, len(class_names))
    captions = read_captions(args.captions, entry.name)
    config = CaptionFilterConfig(min_votes=args.min_votes, context_weight=args.context_weight)
    labels = pseudo_labels(captions, dictionary, class_names, config, progress=not args.quiet)
    write_scores_csv(args.out, labels.ids, labels.categories, labels.scores)
    hard = labels.hard(args.min_votes)
    per_image = hard[:, :len(class_names)].sum(1)
    print(f"{len(labels.ids)} images, {int(labels.num_captions.sum())} captions, dictionary {dictionary.source}")
    print(f"hard labels (>= {args.min_votes} votes): {per_image.mean():.2f} classes per image, "
          f"{int((per_image == 0).sum())} images with no class")
    print(f"wrote {args.out}")
    if args.graph:
        write_graph(args.graph, labels, args.min_votes)
        print(f"wrote {args.graph}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captions.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = DefaultsHelp                                # --help shows every default
    p = sub.add_parser("pseudo-labels", help="captions -> soft pseudo labels CSV (+ co-occurrence graph)",
                       formatter_class=defaults)
    p.add_argument("--dataset", required=True, type=registry.canonical, choices=registry.names())
    p.add_argument("--captions", required=True,
                   help="folder with captions.json (+ re_captions.json), or the authors' caption/ folder or a clone")
    p.add_argument("--out", required=True, help="scores CSV to write")
    p.add_argument("--synonyms", default=None,
                   help="dictionary JSON, or 'paper' for the paper's own (default: the project's, assets/synonyms/)")
    p.add_argument("--graph", default=None, help="also write co-occurrence counts (safetensors)")
    p.add_argument("--min-votes", type=integer_from(1), default=CaptionFilterConfig.min_votes,
                   help="captions needed for a hard label (graph and summary)")
    p.add_argument("--context-weight", type=float, default=CaptionFilterConfig.context_weight,
                   help="tie-break weight of the caption-context model (0: plain vote fraction)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("generate", help="BLIP-2 captions + re-captions for a dataset or a folder of images "
                                        f"(needs the optional extra: {CAPTIONS_INSTALL})",
                       formatter_class=defaults)
    p.add_argument("--dataset", required=True, type=registry.canonical, choices=(*registry.names(), FOLDER),
                   help="a dataset of the registry (registry.py), or 'folder': every JPEG/PNG under --data-root")
    p.add_argument("--data-root", required=True, help="dataset root, or the image folder")
    p.add_argument("--split", default=None, help="split of the dataset (not for a folder)")
    p.add_argument("--model", required=True,
                   help="BLIP-2: a local folder, or a Hugging Face hub id (Salesforce/blip2-opt-2.7b, fetched once)")
    p.add_argument("--out", required=True, help="folder for captions.json and re_captions.json (resumes there)")
    p.add_argument("--synonyms", default=None,
                   help="dictionary JSON or 'paper' (default: the dataset's); a folder needs one for re-captions")
    p.add_argument("--batch-size", type=integer_from(1), default=16, help="images per batch (each asks 6 + 6 prompts)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=integer_from(1), default=30, help="longest answer, in tokens")
    p.add_argument("--workers", type=integer_from(0), default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    p.add_argument("--save-every", type=integer_from(1), default=20, help="batches between progress saves")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_command(lambda: _cmd_pseudo_labels(args) if args.command == "pseudo-labels" else _cmd_generate(args))


if __name__ == "__main__":
    sys.exit(main())
