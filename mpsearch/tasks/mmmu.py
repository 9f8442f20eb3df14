"""MMMU's official answer parsing and scoring, reimplemented (``mps.mmmu``).

The reference is MMMU-Benchmark/MMMU, ``eval/eval_utils.py`` (``parse_multi_choice_response``,
``parse_open_response``, ``eval_multi_choice``, ``eval_open``), ``eval/data_utils.py``
(``get_multi_choice_info``, ``DOMAIN_CAT2SUB_CAT``, ``CAT_SHORT2LONG``) and
``eval/main_eval_only.py`` (per-subject accuracy, ``calculate_ins_level_acc`` micro-averages).
Every rule is kept, quirks included:

* multiple choice: strip ``, . ! ? ; : '`` from both ends one character class after the other,
  pad with a space on each side, look for ``(X)``, then for `` X `` (case-sensitive), then, if the
  response has more than 5 words, for option texts (case-insensitive); several candidates: the
  one whose last occurrence is latest (ties: the earlier letter); none: a random letter;
* open: lower-case, split at newlines, keep the shortest text after the indicators
  (``could be``, ``so``, ``is``, ``thus``, ``therefore``, ``final``, ``answer``, ``result``; ``=`` in the
  last piece), add every number found, normalise (numbers become floats rounded to 2 decimals,
  strings are lower-cased, single characters padded); correct if a string gold answer is a
  substring of a string prediction or a float gold equals a float prediction;
* aggregation: accuracy per subject, micro-averages per discipline and overall.

Two departures, both opt-in or order-only (see docs/architecture.md, "Evaluation rules"):

* the random fallback for unparseable multiple-choice answers draws from an explicit
  ``random.Random`` (``rng``); the default is a module-level ``Random(42)``, the same stream the
  official module gets from ``random.seed(42)`` at import. ``fallback="none"`` returns ``None``
  (counted wrong) instead;
* :func:`parse_open` returns its predictions de-duplicated in first-seen order rather than in
  ``set`` order (which varies with ``PYTHONHASHSEED``); :func:`eval_open` does not depend on order.

Example:
    >>> from mpsearch.tasks import mmmu
    >>> index2ans, choices = mmmu.get_multi_choice_info(["cat", "dog"])
    >>> mmmu.parse_multi_choice("The answer is (B).", choices, index2ans)
    'B'
    >>> mmmu.eval_open("1000", mmmu.parse_open("So the total is 1,000 dollars."))
    True
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mpsearch.errors import MpsError

__all__ = [
    "CAT_SHORT2LONG",
    "DISCIPLINES",
    "DOMAIN_CAT2SUB_CAT",
    "SUBJECTS",
    "SUBJECT_TO_DISCIPLINE",
    "ChoiceParse",
    "Score",
    "aggregate",
    "discipline_of",
    "eval_multi_choice",
    "eval_open",
    "extract_numbers",
    "get_multi_choice_info",
    "normalize_str",
    "official_rng",
    "parse_multi_choice",
    "parse_multi_choice_detail",
    "parse_open",
    "score_response",
    "subject_from_id",
    "load",
    "resolve_subjects",
    "HUB_ID",
    "SPLITS",
]

# --------------------------------------------------------------------------- subjects
#: The six disciplines and their subjects, in the official order (data_utils.DOMAIN_CAT2SUB_CAT).
DOMAIN_CAT2SUB_CAT: dict[str, list[str]] = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
DISCIPLINES: list[str] = list(DOMAIN_CAT2SUB_CAT)

#: Short names the official scripts accept (data_utils.CAT_SHORT2LONG); its value order is the
#: order main_eval_only.py evaluates subjects in (alphabetical by short name).
CAT_SHORT2LONG: dict[str, str] = {
    "acc": "Accounting", "agri": "Agriculture", "arch": "Architecture_and_Engineering",
    "art": "Art", "art_theory": "Art_Theory", "bas_med": "Basic_Medical_Science",
    "bio": "Biology", "chem": "Chemistry", "cli_med": "Clinical_Medicine",
    "cs": "Computer_Science", "design": "Design", "diag_med": "Diagnostics_and_Laboratory_Medicine",
    "econ": "Economics", "elec": "Electronics", "ep": "Energy_and_Power", "fin": "Finance",
    "geo": "Geography", "his": "History", "liter": "Literature", "manage": "Manage",
    "mark": "Marketing", "mate": "Materials", "math": "Math", "mech": "Mechanical_Engineering",
    "music": "Music", "phar": "Pharmacy", "phys": "Physics", "psy": "Psychology",
    "pub_health": "Public_Health", "socio": "Sociology",
}
#: The 30 subjects (= the hub configs of ``MMMU/MMMU``), in CAT_SHORT2LONG order.
SUBJECTS: list[str] = list(CAT_SHORT2LONG.values())
SUBJECT_TO_DISCIPLINE: dict[str, str] = {s: d for d, subs in DOMAIN_CAT2SUB_CAT.items() for s in subs}


def discipline_of(subject: str) -> str | None:
    """The discipline of an MMMU subject, or ``None`` for a subject outside MMMU.

    Example:
        >>> discipline_of("Art_Theory")
        'Art and Design'
    """
    return SUBJECT_TO_DISCIPLINE.get(subject)


def subject_from_id(sample_id: str) -> str:
    """The subject encoded in an MMMU id, as main_eval_only.py reads it: ``"_".join(id.split("_")[1:-1])``.

    Example:
        >>> subject_from_id("validation_Art_Theory_12")
        'Art_Theory'
    """
    return "_".join(str(sample_id).split("_")[1:-1])


# --------------------------------------------------------------------------- multiple choice
#: Characters stripped from both ends of a response, one after the other, in this order.
MC_STRIP_CHARS: tuple[str, ...] = (",", ".", "!", "?", ";", ":", "'")
#: Official threshold: option texts are searched only in responses of more than this many words.
MC_TEXT_MIN_WORDS = 5

_OFFICIAL_RNG = random.Random(42)


def official_rng() -> random.Random:
    """A fresh ``random.Random(42)``: the stream the official module draws from after ``random.seed(42)``.

    Example:
        >>> official_rng().choice(["A", "B", "C", "D"]) == random.Random(42).choice(["A", "B", "C", "D"])
        True
    """
    return random.Random(42)


def get_multi_choice_info(options: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``(index2ans, all_choices)``: letters from ``A`` in list order, as data_utils.get_multi_choice_info.

    Example:
        >>> get_multi_choice_info(["red", "blue"])
        ({'A': 'red', 'B': 'blue'}, ['A', 'B'])
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return dict(zip(letters, options)), letters


@dataclass(frozen=True)
class ChoiceParse:
    """What :func:`parse_multi_choice_detail` found.

    ``pred``: the letter (``None`` when nothing parsed and ``fallback="none"``); ``fallback``: True
    when the letter was not read from the response; ``how``: ``"bracket"``, ``"letter"``, ``"text"``
    or ``"fallback"``; ``candidates``: the letters found, in ``all_choices`` order.
    """

    pred: str | None
    fallback: bool
    how: str
    candidates: tuple[str, ...] = ()


def parse_multi_choice_detail(
    response: str,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    fallback: str = "random",
    rng: random.Random | None = None,
) -> ChoiceParse:
    """Parse a multiple-choice response by the official rules and say how the letter was found.

    ``fallback``: ``"random"`` (official: a random letter from ``rng``, default the module's
    ``Random(42)`` stream) or ``"none"`` (``pred=None``: scored wrong). Either way ``fallback=True``.

    Example:
        >>> parse_multi_choice_detail("I pick (A) or maybe (C)", ["A", "B", "C"], {}).pred
        'C'
    """
    if fallback not in ("random", "none"):
        raise MpsError(f"fallback={fallback!r}: valid values are 'random' (official) and 'none'")
    text = str(response)
    for ch in MC_STRIP_CHARS:  # one character class after the other, each stripped from both ends
        text = text.strip(ch)
    text = f" {text} "

    how = "bracket"
    found = [c for c in all_choices if f"({c})" in text]
    if not found:
        how = "letter"
        found = [c for c in all_choices if f" {c} " in text]
    if not found and len(text.split()) > MC_TEXT_MIN_WORDS:
        how = "text"
        low = text.lower()
        found = [c for c, ans in index2ans.items() if str(ans).lower() in low]

    if not found:
        if fallback == "none":
            return ChoiceParse(None, True, "fallback")
        if not all_choices:
            raise MpsError("parse_multi_choice: all_choices is empty (an open question?); nothing to choose from")
        gen = _OFFICIAL_RNG if rng is None else rng
        return ChoiceParse(gen.choice(list(all_choices)), True, "fallback")
    if len(found) == 1:
        return ChoiceParse(found[0], False, how, tuple(found))

    # Several candidates: the one whose last occurrence starts latest; np.argmax keeps the first
    # maximum, so a tie goes to the candidate listed first (the earlier letter).
    if how == "bracket":
        positions = [text.rfind(f"({c})") for c in found]
    elif how == "letter":
        positions = [text.rfind(f" {c} ") for c in found]
    else:
        low = text.lower()
        positions = [low.rfind(str(index2ans[c]).lower()) for c in found]
    best = max(range(len(found)), key=lambda i: (positions[i], -i))
    return ChoiceParse(found[best], False, how, tuple(found))


def parse_multi_choice(
    response: str,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    fallback: str = "random",
    rng: random.Random | None = None,
) -> str | None:
    """The letter a multiple-choice response gives, by the official rules (see module docstring).

    Example:
        >>> parse_multi_choice("B", ["A", "B", "C", "D"], {})
        'B'
        >>> parse_multi_choice("no idea", ["A", "B"], {"A": "x", "B": "y"}, fallback="none") is None
        True
    """
    return parse_multi_choice_detail(response, all_choices, index2ans, fallback, rng).pred


def eval_multi_choice(answer: str | Sequence[str], parsed: str | None) -> bool:
    """Official eval_multi_choice: exact equality with the gold letter, or with any of a gold list.

    Example:
        >>> eval_multi_choice(["A", "C"], "C"), eval_multi_choice("A", "a")
        (True, False)
    """
    if isinstance(answer, (list, tuple)):
        return any(a == parsed for a in answer)
    return answer == parsed


# --------------------------------------------------------------------------- open questions
_OPEN_INDICATORS: tuple[str, ...] = (
    "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ",
)
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[float | str]:
    """Official normalize_str: a number -> ``[round(float, 2)]`` (commas dropped); else lower-case,
    a single character padded to ``[" x", "x "]``.

    Example:
        >>> normalize_str(" 1,234.567 "), normalize_str("B"), normalize_str("Paris")
        ([1234.57], [' b', 'b '], ['paris'])
    """
    text = str(text).strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def extract_numbers(text: str) -> list[str]:
    """Official extract_numbers: comma-grouped, then scientific, then plain numbers (as strings).

    The three patterns run independently, so ``"1,000"`` yields ``"1,000"`` and also ``"000"``.

    Example:
        >>> extract_numbers("it costs 1,000 or 2.5e3, maybe -7")
        ['1,000', '2.5e3', '000', '2', '-7']
    """
    return _NUM_COMMAS.findall(text) + _NUM_SCIENTIFIC.findall(text) + _NUM_SIMPLE.findall(text)


def _key_subresponses(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    # The official split pattern also splits at ". " before a capital letter; after lower() that
    # never happens, so only newlines split.
    pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys: list[str] = []
    for i, piece in enumerate(pieces):
        indicators = _OPEN_INDICATORS + (("=",) if i == len(pieces) - 1 else ())
        shortest: str | None = None
        for ind in indicators:
            if ind not in piece:
                continue
            tail = piece.split(ind)[-1].strip()
            # Official: an empty shortest ("" is falsy) is replaced by the next tail whatever its length.
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [text]


def parse_open(response: str) -> list[float | str]:
    """Predictions of an open response by the official rules (parse_open_response).

    Key sub-responses (text after the last indicator, shortest per line) plus every number in
    them, normalised by :func:`normalize_str`, de-duplicated in first-seen order.

    Example:
        >>> parse_open("The speed is 12.345 m/s")
        ['12.345 m/s', 12.35]
    """
    keys = _key_subresponses(str(response))
    raw: list[str] = list(keys)
    for k in keys:
        raw.extend(extract_numbers(k))
    out: list[float | str] = []
    for item in raw:
        for norm in normalize_str(item):
            if norm not in out:
                out.append(norm)
    return out


def eval_open(answer: str | Sequence[str], parsed: Iterable[float | str]) -> bool:
    """Official eval_open: a string gold must be a substring of a string prediction, a float gold
    equal to a float prediction; strings never match numbers. ``answer`` may be a list.

    Example:
        >>> eval_open(["7", "seven"], ["it has seven sides"]), eval_open("3", ["3 apples"])
        (True, False)
    """
    if isinstance(answer, (list, tuple)):
        golds: list[float | str] = []
        for a in answer:
            golds.extend(normalize_str(str(a)))
    else:
        golds = normalize_str(str(answer))
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# --------------------------------------------------------------------------- one question
@dataclass(frozen=True)
class Score:
    """One scored answer: the parsed prediction, correctness, and whether the fallback decided it."""

    pred: Any
    correct: bool
    fallback: bool = False


def score_response(
    response: str,
    question_type: str,
    answer: str | Sequence[str],
    options: Sequence[str] = (),
    fallback: str = "random",
    rng: random.Random | None = None,
) -> Score:
    """Parse and score one response the way main_parse_and_eval.py does.

    Example:
        >>> score_response("(B)", "multiple-choice", "B", ["x", "y"]).correct
        True
    """
    if question_type == "multiple-choice":
        index2ans, choices = get_multi_choice_info(list(options))
        p = parse_multi_choice_detail(response, choices, index2ans, fallback, rng)
        return Score(p.pred, eval_multi_choice(answer, p.pred), p.fallback)
    preds = parse_open(response)
    return Score(preds, eval_open(answer, preds), False)


# --------------------------------------------------------------------------- aggregation
@dataclass
class Aggregate:
    """Official figures: per-subject accuracy and count, per-discipline and overall micro-averages."""

    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    per_discipline: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-ready)."""
        return {"per_subject": self.per_subject, "per_discipline": self.per_discipline, "overall": self.overall}


def aggregate(items: Iterable[tuple[str, bool]]) -> Aggregate:
    """Per-subject accuracy and the micro-averages main_eval_only.py prints (unrounded here).

    ``items``: ``(subject, correct)`` per question. A discipline appears when at least one of its
    subjects has questions; its accuracy is ``sum(acc_s * n_s) / sum(n_s)`` over its subjects,
    which is the share of its questions answered correctly. Subjects outside MMMU count in
    ``overall`` only.

    Example:
        >>> a = aggregate([("Art", True), ("Art", False), ("Music", True), ("Math", False)])
        >>> a.per_discipline["Art and Design"]["acc"], a.overall["acc"], a.overall["num"]
        (0.6666666666666666, 0.5, 4)
    """
    counts: dict[str, list[int]] = {}
    for subject, ok in items:
        c = counts.setdefault(str(subject), [0, 0])
        c[0] += int(bool(ok))
        c[1] += 1
    out = Aggregate()
    for s, (right, n) in counts.items():
        out.per_subject[s] = {"acc": right / n, "num": n, "correct": right}

    def micro(subjects: Iterable[str]) -> dict[str, float]:
        # calculate_ins_level_acc: sum(acc * num) / sum(num), 0 when there are no questions.
        rows = [out.per_subject[s] for s in subjects if s in out.per_subject]
        num = sum(int(r["num"]) for r in rows)
        acc = sum(r["acc"] * r["num"] for r in rows) / num if num else 0.0
        return {"acc": acc, "num": num}

    for d, subs in DOMAIN_CAT2SUB_CAT.items():
        if any(s in out.per_subject for s in subs):
            out.per_discipline[d] = micro(subs)
    out.overall = micro(out.per_subject)
    return out


# --------------------------------------------------------------------------- loading
HUB_ID = "MMMU/MMMU"
SPLITS = ("dev", "validation", "test")
#: Columns a combined (all-subjects) dataset may carry its subject in, first found wins; without
#: one the subject is read from the id (``validation_Art_Theory_12`` -> ``Art_Theory``).
SUBJECT_FIELDS = ("subject", "subdomain", "subset", "category", "config")
_REQUIRED = ("id", "question", "options", "answer", "question_type")


def resolve_subjects(subjects: Iterable[str] | str | None) -> list[str] | None:
    """MMMU subject names from long (``Art_Theory``) or short (``art_theory``) names, any case.

    Example:
        >>> resolve_subjects(["acc", "art theory"])
        ['Accounting', 'Art_Theory']
    """
    if subjects is None:
        return None
    if isinstance(subjects, str):
        subjects = [s for s in subjects.split(",") if s.strip()]
    lookup = {s.lower(): s for s in SUBJECTS}
    lookup.update({k.lower(): v for k, v in CAT_SHORT2LONG.items()})
    out: list[str] = []
    for s in subjects:
        key = str(s).strip().lower().replace(" ", "_")
        if key not in lookup:
            raise MpsError(f"subjects: {s!r} is not an MMMU subject; valid: {', '.join(SUBJECTS)} "
                           f"(or the short names {', '.join(CAT_SHORT2LONG)})")
        if lookup[key] not in out:
            out.append(lookup[key])
    return out


def _mmmu_segment(ds: Any, hint: str | None, where: str) -> Any:
    from mpsearch.tasks import base

    base.require_columns(ds, where, _REQUIRED, "MMMU")
    n = len(ds)
    if hint in SUBJECTS:
        subj = [hint] * n
    else:
        col = next((c for c in SUBJECT_FIELDS if c in ds.column_names), None)
        subj = [str(s) for s in base.column(ds, col)] if col else [subject_from_id(i) for i in base.column(ds, "id")]
    ids = [str(i) for i in base.column(ds, "id")]
    qtypes = [str(t) for t in base.column(ds, "question_type")]
    answers = base.column(ds, "answer")
    options = base.column(ds, "options")
    questions = [
        base.Question(ids[k], subj[k], qtypes[k], base._parse_options(options[k], f"{where} row {k} ({ids[k]})"),
                      base.parse_answer(answers[k]))
        for k in range(n)
    ]

    def mapper(row: dict, j: int) -> dict:
        out = dict(row)
        for i in range(1, base.MAX_IMAGES + 1):
            out.setdefault(f"image_{i}", None)
        out["subject"] = subj[j]
        return out

    return base.Segment(ds, where, list(range(n)), questions, mapper)


def load(split: str = "validation", path: str | os.PathLike[str] | None = None,
         subjects: Iterable[str] | str | None = None, limit: int | None = None) -> Any:
    """Load MMMU (all 30 subjects, or ``subjects``) as a :class:`mpsearch.tasks.base.Benchmark`.

    ``path``: a local directory (layouts in ``base.LOCAL_LAYOUTS``) or a hub id; None: the hub
    cache, then ``load_dataset("MMMU/MMMU", subject)`` per subject (the hub, or the datasets cache).

    Example:
        >>> bench = load("validation", path="data/mmmu", subjects=["Art"])  # doctest: +SKIP
    """
    from pathlib import Path

    from mpsearch.tasks import base

    if split not in SPLITS:
        raise MpsError(f"mmmu: split {split!r} does not exist; valid: {', '.join(SPLITS)}")
    wanted = resolve_subjects(subjects)
    hub = base.HubState()
    repo = HUB_ID
    raw: list[tuple[str | None, Any, str]] = []
    source = ""
    if path is not None and Path(path).expanduser().is_dir():
        root = Path(path).expanduser()
        raw = base.local_segments(root, split)
        source = str(root)
    elif path is not None and not base.is_hub_id(str(path)):
        raise MpsError(f"{path}: no such directory (pass a directory saved with datasets.save_to_disk, "
                       f"a snapshot of {HUB_ID}, or a hub id such as {HUB_ID})")
    else:
        repo = str(path) if path is not None else HUB_ID
        raw = base.hub_snapshot_segments(repo, split)
        source = f"hub cache {repo}" if raw else ""
        if raw and wanted:
            raw = [r for r in raw if r[0] is None or r[0] in wanted]
        if not raw:
            try:
                for subject in wanted or SUBJECTS:
                    ds = base.load_hub_config(repo, subject, split, hub)
                    raw.append((subject, ds, f"{repo}/{subject}"))
            except base.NotFound:
                raise MpsError(base.not_found_message("mmmu", repo, split, hub)) from None
            source = f"{repo} via datasets.load_dataset ({hub.describe()})"
    segments = [_mmmu_segment(ds, hint, where) for hint, ds, where in raw]
    return base.assemble("mmmu", split, segments, wanted, limit, source)
