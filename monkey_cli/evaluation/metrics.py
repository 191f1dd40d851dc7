"""The four VQA metrics of the original Monkey evaluation, reproduced number for number.

The original (`eval/evaluate_vqa.py` + the VQA toolkit's `vqa_eval.py`) has quirks that change scores;
they are kept on purpose so that numbers are comparable with the paper, and each one is named where it
is implemented:

* ANLS: edit distance of the lower-cased, stripped strings, divided by the length of the *unstripped*,
  original-case strings (the answer is stripped beforehand, the annotation is not).
* relaxed accuracy: the model's answer plays the role of the *target*, the annotation the prediction.
* accuracy: the annotation only has to be a *substring* of the answer, from which every `.` is removed.
* VQA score: the answer is normalised, the ten human answers only get punctuation processing (and only
  when they are not all identical); leave-one-out compares whole answer records, so records without
  `answer_id` that are identical drop out together.

Only the standard library and rapidfuzz are imported: scoring never pulls in torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapidfuzz.distance import Levenshtein

ANLS_THRESHOLD = 0.5
RELAXED_MAX_RELATIVE_CHANGE = 0.05
VQA_ROUNDING_DIGITS = 2  # VQAEval(n=2), as the Monkey eval constructs it

METRICS = ("anls", "relaxed_accuracy", "accuracy", "vqa_score")


# --------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA, ST-VQA, EST-VQA)
# --------------------------------------------------------------------------------------------------


def _normalized_distance(annotation: str, answer: str) -> float:
    # The distance ignores case and outer whitespace, the normaliser does not (original behaviour).
    longest = max(len(annotation), len(answer))
    if longest == 0:
        return 0.0
    return Levenshtein.distance(annotation.lower().strip(), answer.lower().strip()) / longest


def anls(answer: str, annotations: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalized Levenshtein Similarity of one answer against its annotations (0 below threshold)."""
    _require_annotations(annotations)
    answer = answer.strip()
    similarity = 1 - min(_normalized_distance(annotation, answer) for annotation in annotations)
    return similarity if similarity >= threshold else 0.0


# --------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA): numbers within 5 %, otherwise case-insensitive equality
# --------------------------------------------------------------------------------------------------


def _parse_number(text: str) -> float | None:
    """Python `float()` semantics (so `1e3`, `1_000`, ` 12 `, `inf` parse); trailing `%` signs mean /100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = RELAXED_MAX_RELATIVE_CHANGE) -> bool:
    """Pix2Struct's relaxed correctness: relative error w.r.t. `target` within the tolerance.

    A `target` that parses to zero (or does not parse) falls back to case-insensitive string equality.
    """
    predicted_number = _parse_number(prediction)
    target_number = _parse_number(target)
    if predicted_number is not None and target_number:  # a zero target cannot be divided by
        return abs(predicted_number - target_number) / abs(target_number) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(answer: str, annotations: Sequence[str]) -> float:
    """1.0 if any annotation is relaxed-correct; the stripped ANSWER is the target, as in the original."""
    _require_annotations(annotations)
    target = answer.strip()
    return 1.0 if any(relaxed_correctness(target, annotation) for annotation in annotations) else 0.0


# --------------------------------------------------------------------------------------------------
# Accuracy (GQA, AI2D, DeepForm, KLC, WTQ): the annotation contained in the answer
# --------------------------------------------------------------------------------------------------


def exact_match(answer: str, annotations: Sequence[str]) -> float:
    """1.0 if a stripped, lower-cased annotation is a substring of the lower-cased answer without dots."""
    _require_annotations(annotations)
    haystack = answer.strip().lower().replace(".", "")
    return 1.0 if any(annotation.strip().lower() in haystack for annotation in annotations) else 0.0


_GQA_LEADING_MARKERS = ("is ", "are ", "a ", "an ", "the ")


def gqa_postprocess(answer: str) -> str:
    """The answer clean-up the original applies to GQA before exact matching.

    Keep the first clause (up to `.`, `,` or `!`), lower-case it, then for each marker present keep the
    text between its first and second occurrence (so "this is a cat" becomes "" and "banana split"
    becomes "split": the markers are plain substrings, not words), and cut at the first " of".
    """
    text = answer.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for marker in _GQA_LEADING_MARKERS:
        if marker in text:
            text = text.split(marker)[1]
    if " of" in text:
        text = text.split(" of")[0]
    return text.strip()


# --------------------------------------------------------------------------------------------------
# VQA score (VQAv2, OK-VQA, TextVQA, VizWiz): the official VQA normalisation and 10-human consensus
# --------------------------------------------------------------------------------------------------

# Each mark is handled on its own (the decision looks at the original text), so their order is irrelevant.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern's look-behind is misspelt as a look-ahead that never fires, so every period not
# followed by a digit goes; `re.UNICODE` (32) is passed where the count belongs, so at most 32 of them.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_STRIPPED = 32

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, written as "spelling -> replacement" pairs. Entries that can never
# match are left out: capitalised keys (words are lower-cased first) and identities. "somebody'd" ->
# "somebodyd" is a typo in the official table, kept because it changes scores.
_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's
howd how'd  howll how'll  hows how's  isnt isn't  itd it'd  itd've it'd've  it'dve it'd've  itll it'll
maam ma'am  mightnt mightn't  mightnt've mightn't've  mightn'tve mightn't've  mightve might've
mustnt mustn't  mustve must've  neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't
ow's'at 'ow's'at  'ows'at 'ow's'at  'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've
shouldve should've  shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've
somebody'd somebodyd  somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll
somebodys somebody's  someoned someone'd  someoned've someone'd've  someone'dve someone'd've
someonell someone'll  someones someone's  somethingd something'd  somethingd've something'd've
something'dve something'd've  somethingll something'll  thats that's  thered there'd
thered've there'd've  there'dve there'd've  therere there're  theres there's  theyd they'd
theyd've they'd've  they'dve they'd've  theyll they'll  theyre they're  theyve they've  twas 'twas
wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've  werent weren't  whatll what'll
whatre what're  whats what's  whatve what've  whens when's  whered where'd  wheres where's
whereve where've  whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's
whove who've  whyll why'll  whyre why're  whys why's  wont won't  wouldve would've  wouldnt wouldn't
wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've
you'dve you'd've  youll you'll  youre you're  youve you've
"""


def _parse_pairs(text: str) -> dict[str, str]:
    words = text.split()
    return dict(zip(words[0::2], words[1::2], strict=True))


_CONTRACTIONS = _parse_pairs(_CONTRACTION_PAIRS)


def vqa_process_punctuation(text: str) -> str:
    """VQA punctuation handling: a mark is deleted when it touches a space somewhere in the text (or the
    text has a digit,digit comma anywhere), otherwise replaced by a space; then periods are stripped."""
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in _VQA_PUNCTUATION:
        # The test looks at the ORIGINAL text, the replacement applies to the text processed so far.
        if has_digit_comma or f"{mark} " in text or f" {mark}" in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_MAX_PERIODS_STRIPPED)


def vqa_process_digits_articles(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions; words re-joined by spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_normalize_answer(answer: str) -> str:
    """How the model's answer is normalised before it is compared with the human answers."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digits_articles(vqa_process_punctuation(answer))


def vqa_normalize_human_answers(human_answers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the human answer records as the comparison sees them.

    They are NOT lower-cased nor digit/article-processed; punctuation is processed only when the answers
    are not all identical (so ten identical "red." never equal a normalised "red").
    """
    records = [dict(record) for record in human_answers]
    if len({record["answer"] for record in records}) > 1:
        for record in records:
            record["answer"] = vqa_process_punctuation(record["answer"])
    return records


def vqa_accuracy(answer: str, human_answers: Sequence[Mapping[str, Any] | str]) -> float:
    """Unrounded VQA accuracy in [0, 1]: mean over the humans of min(1, matches among the others / 3).

    `human_answers` are annotation records (`{"answer": ..., "answer_id": ...}`) or plain strings (which
    get answer_id 1, 2, ...). "The others" are the records not EQUAL to the held-out one, as the
    official code compares whole records: identical records without `answer_id` leave together.
    """
    records = vqa_normalize_human_answers(as_vqa_answer_records(human_answers))
    if not records:
        raise ValueError("no human answers to compare with")
    prediction = vqa_normalize_answer(answer)
    per_human = []
    for held_out in records:
        matches = sum(1 for other in records if other != held_out and other["answer"] == prediction)
        per_human.append(min(1, matches / 3))
    return sum(per_human) / len(per_human)


def vqa_round(accuracy: float, digits: int = VQA_ROUNDING_DIGITS) -> float:
    """A [0, 1] accuracy as the VQA toolkit reports it: in percent, rounded to `digits` decimals."""
    return round(100 * accuracy, digits)


def as_vqa_answer_records(human_answers: Sequence[Mapping[str, Any] | str]) -> list[dict[str, Any]]:
    """Annotation records as given, or plain strings turned into records with answer_id 1..n."""
    records = []
    for index, entry in enumerate(human_answers, start=1):
        if isinstance(entry, str):
            records.append({"answer": entry, "answer_id": index})
        else:
            records.append(dict(entry))
    return records


# --------------------------------------------------------------------------------------------------
# Aggregation over a set of predictions
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoredItem:
    """What one prediction contributes: its key, its score in [0, 1], and what the metric compared."""

    key: Any
    score: float
    compared: str | None = None  # the answer after post-processing, when the metric changes it
    answer_type: str | None = None
    question_type: str | None = None


@dataclass
class MetricResult:
    """A metric over a set of predictions, reported the way the original eval prints it.

    `score` is a fraction in [0, 1] for anls / relaxed_accuracy / accuracy, and a percentage rounded to
    two decimals for vqa_score (the VQA toolkit's `accuracy["overall"]`). `percent` is always 0-100.
    """

    metric: str
    score: float
    n: int
    percent: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "percent": self.percent, "n": self.n, **self.details}


def score_item(
    metric: str,
    answer: str,
    annotations: Sequence[str] | None = None,
    *,
    human_answers: Sequence[Mapping[str, Any] | str] | None = None,
    gqa: bool = False,
) -> tuple[float, str | None]:
    """One prediction's score in [0, 1] (unrounded) and, when the metric rewrites the answer, the rewrite."""
    if metric == "anls":
        return anls(answer, _need(annotations)), None
    if metric == "relaxed_accuracy":
        return relaxed_accuracy(answer, _need(annotations)), None
    if metric == "accuracy":
        compared = gqa_postprocess(answer) if gqa else answer
        return exact_match(compared, _need(annotations)), (compared if gqa else None)
    if metric == "vqa_score":
        records = human_answers if human_answers is not None else _need(annotations)
        return vqa_accuracy(answer, records), vqa_normalize_answer(answer)
    raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")


def aggregate(metric: str, items: Iterable[ScoredItem]) -> MetricResult:
    """Mean over the items, with the VQA toolkit's rounding and per-type breakdowns for vqa_score."""
    items = list(items)
    if not items:
        return MetricResult(metric=metric, score=math.nan, n=0, percent=math.nan)
    scores = [item.score for item in items]
    if metric != "vqa_score":
        # sum/len as evaluate_vqa.py (np.mean for ANLS agrees to the last bits that matter, < 1e-15).
        mean = sum(scores) / len(scores)
        return MetricResult(metric=metric, score=mean, n=len(items), percent=100 * mean)
    overall = 100 * sum(scores) / len(scores)
    details: dict[str, Any] = {"score_unrounded": round(overall, 10)}  # what VQAEval(n=10) reports
    for kind in ("answer_type", "question_type"):
        groups: dict[str, list[float]] = {}
        for item in items:
            label = getattr(item, kind)
            if label is not None:
                groups.setdefault(label, []).append(item.score)
        if groups:
            details[f"per_{kind}"] = {
                label: round(100 * sum(values) / len(values), VQA_ROUNDING_DIGITS)
                for label, values in sorted(groups.items())
            }
    rounded = round(overall, VQA_ROUNDING_DIGITS)
    return MetricResult(metric=metric, score=rounded, n=len(items), percent=rounded, details=details)


def _require_annotations(annotations: Sequence[str]) -> None:
    if isinstance(annotations, str):
        raise TypeError("annotations must be a sequence of strings, not one string")
    if len(annotations) == 0:
        raise ValueError("no annotation to compare with")


def _need(annotations: Sequence[str] | None) -> Sequence[str]:
    if annotations is None:
        raise ValueError("no annotation to compare with")
    return annotations
