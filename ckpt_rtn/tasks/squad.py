"""SQuAD v1.1 as Golden Stick evaluates it, and the official SQuAD v1.1 EM/F1 (MindSpore-free).

Golden Stick's RTN table reports SQuAD 1.1 F1/EM through `SQuADDataset._load` in
golden-stick's `mindspore_gs/datasets/squad.py`: one sample per paragraph of
`dev-v1.1.json`, in file order, made of the paragraph's first question and that
question's first gold answer, the question put to the model in `TEMPLATE` (copied
from that source; the data README quotes the same text). The generated text is
stripped and cut at its first newline, as `EmF1Metric.update` in MindFormers'
`mindformers/core/metric/metric.py` does, then scored. `load`, `prompt` and
`answer` reproduce those steps, so our numbers stand next to that table.

The table's metric is MindFormers' `EmF1Metric` (run by `ckpt_rtn.runtime` with
MindFormers' own class); the one papers quote is the official script,
`evaluate-v1.1.py`, implemented here in `official_scores`. Both are reported,
labelled, because they disagree. The official one scores against every gold answer
and keeps the best; it lower-cases, removes all ASCII punctuation
(`string.punctuation`) and the articles a/an/the, splits on whitespace and takes F1
from the bag-of-tokens overlap, so word order does not matter. `EmF1Metric` scores
against the first gold answer only; it lower-cases and removes a fixed list of
characters (mostly CJK punctuation, plus ASCII ``- : _ * ^ / \\ ~ ` + =``; ``. , ' "
? ! ( )`` stay), keeps the articles, segments with jieba (in English each word,
each space and each remaining punctuation mark is a segment) and takes F1 from the
longest common *contiguous* run of segments (its `find_lcs` is a longest common
substring, despite the name); its EM compares the strings with only those
characters removed. "The Denver Broncos." against "Denver Broncos" is EM 100 /
F1 100 officially and EM 0 / F1 66.7 by `EmF1Metric`.
"""
from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..paths import input_stat

#: Golden Stick's prompt (`mindspore_gs/datasets/squad.py`, `SQuADDataset._load`).
TEMPLATE = ("Read the passage and answer the question below.\n\n### Instruction:\n{context}"
            "\n\n### Input:\n{question}\n\n### Response:")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Sample:
    """One paragraph's item: its first question, with the gold answers each metric needs."""

    id: str                     # the question's SQuAD id
    context: str
    question: str
    answer: str                 # the first gold answer: what EmF1Metric scores against
    answers: Tuple[str, ...]    # every gold answer: what the official script scores against


def load(path: "os.PathLike[str] | str", samples: Optional[int] = None) -> List[Sample]:
    """The first `samples` paragraphs (all when None) of a `dev-v1.1.json`-format file.

    Fewer paragraphs than asked is not an error (there is what there is);
    none is. Only the paragraphs taken are checked, as Golden Stick reads
    only those, and of each only the first question.
    """
    if samples is not None and samples < 1:
        raise ConfigError(path, f"--squad-samples must be at least 1, not {samples}")
    articles = _field(_read_json(path), "data", list, "top level", path)
    found: List[Sample] = []
    for i, article in enumerate(articles):
        for j, paragraph in enumerate(_field(article, "paragraphs", list, f"data[{i}]", path)):
            found.append(_sample(paragraph, f"data[{i}].paragraphs[{j}]", path))
            if len(found) == samples:
                return found
    if not found:
        raise ConfigError(path, 'no paragraphs: "data" holds no article with a paragraph')
    return found


def _read_json(path: "os.PathLike[str] | str") -> Any:
    input_stat(path, ConfigError, "a JSON file")
    try:
        with open(path, "rb") as stream:
            return json.load(stream)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not JSON: not UTF-8 text") from None
    except ValueError as exc:  # json.JSONDecodeError, or a number Python refuses to convert
        raise ConfigError(path, f"not JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(path, "not JSON this tool reads: nested too deeply") from None


def _field(obj: Any, key: str, kind: type, where: str, path: "os.PathLike[str] | str") -> Any:
    """obj[key], which must be a `kind`; anything else is a ConfigError saying where."""
    if not isinstance(obj, dict):
        raise ConfigError(path, f"not a SQuAD file: {where} is not a JSON object")
    value = obj.get(key)
    if not isinstance(value, kind):
        noun = "list" if kind is list else "string"
        raise ConfigError(path, f'not a SQuAD file: {where} has no "{key}" {noun}')
    return value


def _sample(paragraph: Any, where: str, path: "os.PathLike[str] | str") -> Sample:
    context = _field(paragraph, "context", str, where, path)
    questions = _field(paragraph, "qas", list, where, path)
    if not questions:
        raise ConfigError(path, f'{where} has no question ("qas" is empty)')
    where += ".qas[0]"
    question = _field(questions[0], "question", str, where, path)
    qid = _field(questions[0], "id", str, where, path)
    golds = _field(questions[0], "answers", list, where, path)
    if not golds:
        raise ConfigError(path, f'{where} has no gold answer ("answers" is empty)')
    answers = tuple(_field(gold, "text", str, f"{where}.answers[{k}]", path)
                    for k, gold in enumerate(golds))
    return Sample(qid, context, question, answers[0], answers)


def prompt(sample: Sample) -> str:
    """The text the model continues."""
    return TEMPLATE.format(context=sample.context, question=sample.question)


def answer(generated: str) -> str:
    """What is scored of a generation: stripped, then cut before its first newline.

    In `EmF1Metric.update`'s order, so spaces before that newline stay
    (both metrics ignore them).
    """
    return generated.strip().split("\n")[0]


def answered(generated: str) -> bool:
    """Whether generating more can no longer change `answer(generated)`: a newline follows
    the first non-space character (a newline before it, as in "\\nParis", is stripped)."""
    return "\n" in generated.lstrip()


def normalize_answer(text: str) -> str:
    """Lower-cased, ASCII punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, gold: str) -> float:
    """Harmonic mean of the precision and recall of the shared tokens (a multiset), in [0, 1]."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def official_scores(predictions: Sequence[str], samples: Sequence[Sample]) -> Tuple[float, float]:
    """(EM, F1) in percent, each prediction against the best of its sample's gold answers.

    `predictions` are the scored answers (`answer` of each generation), one
    per sample, in order.
    """
    if len(predictions) != len(samples) or not samples:
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    em = sum(any(exact_match_score(p, gold) for gold in s.answers)
             for p, s in zip(predictions, samples))
    f1 = sum(max(f1_score(p, gold) for gold in s.answers) for p, s in zip(predictions, samples))
    return 100.0 * em / len(samples), 100.0 * f1 / len(samples)
