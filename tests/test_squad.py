"""SQuAD v1.1 as Golden Stick reads it, and the official EM/F1 (no MindSpore)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest

from ckpt_rtn.errors import ConfigError
from ckpt_rtn.tasks import squad
from ckpt_rtn.tasks.squad import Sample

#: The real SQuAD v1.1 dev set (shared/ sits beside the checkout).
DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v1.1" / "dev-v1.1.json"


def qa(qid: str, question: str, *answers: str) -> Dict[str, Any]:
    return {"id": qid, "question": question,
            "answers": [{"answer_start": 0, "text": text} for text in answers]}


#: Two articles, three paragraphs; the first paragraph has two questions, its first two answers.
SMALL: Dict[str, Any] = {
    "version": "1.1", "canary": "an extra top-level key, as the real file has",
    "data": [
        {"title": "A", "paragraphs": [
            {"context": "Cats purr.", "qas": [qa("q1", "Who purrs?", "Cats", "cats purr"),
                                              qa("q2", "What do cats do?", "purr")]},
            {"context": "Dogs bark {loudly}.", "qas": [qa("q3", "Who barks?", "Dogs")]},
        ]},
        {"title": "B", "paragraphs": [
            {"context": "Cows moo.", "qas": [qa("q4", "Who moos?", "Cows")]},
        ]},
    ],
}

SMALL_SAMPLES = [
    Sample("q1", "Cats purr.", "Who purrs?", "Cats", ("Cats", "cats purr")),
    Sample("q3", "Dogs bark {loudly}.", "Who barks?", "Dogs", ("Dogs",)),
    Sample("q4", "Cows moo.", "Who moos?", "Cows", ("Cows",)),
]


def write(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "dev.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content),
                        encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dev() -> List[Sample]:
    if not DEV.is_file():
        pytest.skip(f"{DEV} not present")
    return squad.load(DEV)


def test_real_dev_set_gives_one_sample_per_paragraph(dev: List[Sample]) -> None:
    assert len(dev) == 2067
    first = dev[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answer == "Denver Broncos"
    assert first.answers == ("Denver Broncos",) * 3
    assert first.context.startswith("Super Bowl 50 was an American football game")
    # Every sample is its paragraph's first question, in file order.
    document = json.loads(DEV.read_text(encoding="utf-8"))
    firsts = [p["qas"][0] for a in document["data"] for p in a["paragraphs"]]
    assert [s.id for s in dev] == [q["id"] for q in firsts]
    assert [s.answers for s in dev] == [tuple(g["text"] for g in q["answers"]) for q in firsts]
    assert all(s.answer == s.answers[0] for s in dev)
    assert any(len(set(s.answers)) > 1 for s in dev)  # so "all gold answers" is exercised


def test_real_dev_set_samples_are_the_first_paragraphs(dev: List[Sample]) -> None:
    assert squad.load(DEV, samples=5) == dev[:5]


def test_load_takes_the_first_question_of_each_paragraph_across_articles(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL)
    assert squad.load(path) == SMALL_SAMPLES
    assert squad.load(path, samples=2) == SMALL_SAMPLES[:2]
    # More than the file has is what it has.
    assert squad.load(path, samples=99) == SMALL_SAMPLES


def test_load_checks_only_what_it_takes(tmp_path: Path) -> None:
    """Golden Stick reads the first question of the first N paragraphs, nothing else."""
    data = copy.deepcopy(SMALL)
    data["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []    # a second question
    data["data"][1]["paragraphs"][0].pop("qas")                   # the third paragraph
    path = write(tmp_path, data)
    assert squad.load(path, samples=2) == SMALL_SAMPLES[:2]
    with pytest.raises(ConfigError, match=r'data\[1\]\.paragraphs\[0\] has no "qas" list'):
        squad.load(path)


def _without(key: str, *where: Any) -> Dict[str, Any]:
    """SMALL with `key` removed from the object at path `where`."""
    data = copy.deepcopy(SMALL)
    obj = data
    for step in where:
        obj = obj[step]
    obj.pop(key)
    return data


def _replaced(value: Any, key: str, *where: Any) -> Dict[str, Any]:
    data = copy.deepcopy(SMALL)
    obj = data
    for step in where:
        obj = obj[step]
    obj[key] = value
    return data


P0 = ("data", 0, "paragraphs", 0)
Q0 = P0 + ("qas", 0)


@pytest.mark.parametrize("content, reason", [
    ('{"data": [', "not JSON: Expecting value: line 1 column 11"),
    (b'{"data": "\xff"}', "not JSON: not UTF-8 text"),
    ("[" * 200_000, "nested too deeply"),
    ([SMALL], "top level is not a JSON object"),
    ({"version": "1.1"}, 'top level has no "data" list'),
    ({"data": {"paragraphs": []}}, 'top level has no "data" list'),
    ({"data": []}, "no paragraphs"),
    ({"data": [{"paragraphs": []}]}, "no paragraphs"),
    ({"data": ["A"]}, r"data\[0\] is not a JSON object"),
    ({"data": [{"title": "A"}]}, r'data\[0\] has no "paragraphs" list'),
    (_without("qas", *P0), r'data\[0\]\.paragraphs\[0\] has no "qas" list'),
    (_replaced([], "qas", *P0), r'data\[0\]\.paragraphs\[0\] has no question \("qas" is empty\)'),
    (_without("context", *P0), r'data\[0\]\.paragraphs\[0\] has no "context" string'),
    (_without("question", *Q0), r'paragraphs\[0\]\.qas\[0\] has no "question" string'),
    (_replaced(7, "id", *Q0), r'paragraphs\[0\]\.qas\[0\] has no "id" string'),
    (_without("answers", *Q0), r'qas\[0\] has no "answers" list'),
    (_replaced([], "answers", *Q0), r'qas\[0\] has no gold answer \("answers" is empty\)'),
    (_without("text", *Q0, "answers", 1), r'qas\[0\]\.answers\[1\] has no "text" string'),
    (_replaced(None, "text", *Q0, "answers", 0), r'qas\[0\]\.answers\[0\] has no "text" string'),
])
def test_malformed_files_are_one_line_config_errors(tmp_path: Path, content: Any,
                                                    reason: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError, match=reason) as caught:
        squad.load(path)
    assert caught.value.path == str(path)
    assert "\n" not in str(caught.value)


def test_unreadable_paths_and_bad_counts_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open: No such file or directory"):
        squad.load(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="is a directory, not a JSON file"):
        squad.load(tmp_path)
    os.mkfifo(tmp_path / "fifo.json")  # it was opened, and waited for a writer
    with pytest.raises(ConfigError, match="is a FIFO"):
        squad.load(tmp_path / "fifo.json")
    path = write(tmp_path, SMALL)
    for samples in (0, -3):
        with pytest.raises(ConfigError, match=f"--squad-samples must be at least 1, not {samples}"):
            squad.load(path, samples=samples)


def test_prompt_is_golden_sticks_template() -> None:
    # Braces in the passage are text, not format fields.
    assert squad.prompt(SMALL_SAMPLES[1]) == (
        "Read the passage and answer the question below.\n\n"
        "### Instruction:\nDogs bark {loudly}.\n\n"
        "### Input:\nWho barks?\n\n"
        "### Response:")


@pytest.mark.parametrize("generated, scored", [
    (" Denver Broncos\n\n### Input:\nWho won?", "Denver Broncos"),
    ("\n\n  Denver Broncos  ", "Denver Broncos"),       # leading newlines go with the strip
    ("Denver  \nBroncos", "Denver  "),                  # strip first, then cut: as EmF1Metric
    ("Denver Broncos", "Denver Broncos"),
    ("  \n ", ""),
])
def test_answer_is_the_first_line_of_the_stripped_generation(generated: str, scored: str) -> None:
    assert squad.answer(generated) == scored


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces() -> None:
    assert squad.normalize_answer("  The  Denver, Broncos! ") == "denver broncos"
    assert squad.normalize_answer("an apple and A pear") == "apple and pear"
    # Whole words only; punctuation goes before articles are looked for.
    assert squad.normalize_answer("Theatre, then-the end") == "theatre thenthe end"
    assert squad.normalize_answer("U.S.-based (a) 'firm'") == "usbased firm"


def test_exact_match_after_normalization() -> None:
    assert squad.exact_match_score("the Denver Broncos.", "Denver Broncos")
    assert not squad.exact_match_score("Denver", "Denver Broncos")
    assert not squad.exact_match_score("", "Denver")
    assert squad.exact_match_score("", "The!")  # both normalize to nothing


def test_f1_is_bag_of_tokens_overlap() -> None:
    # 2 shared tokens: precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert squad.f1_score("Denver Broncos won the title", "the Denver Broncos") == \
        pytest.approx(2 / 3)
    # Order does not matter.
    assert squad.f1_score("Broncos of Denver", "Denver Broncos") == pytest.approx(0.8)
    # Shared tokens are a multiset: "go" is shared once; precision 1/3, recall 1 -> 0.5.
    assert squad.f1_score("go go go", "go") == pytest.approx(0.5)
    assert squad.f1_score("Denver Broncos", "the denver broncos") == 1.0
    assert squad.f1_score("", "Denver") == 0.0
    assert squad.f1_score("", "the") == 0.0  # nothing shared, even when both are empty


def test_official_scores_take_the_best_gold_answer_and_average_in_percent() -> None:
    samples = [
        Sample("a", "", "", "Denver Broncos", ("Denver Broncos", "Broncos")),
        Sample("b", "", "", "Carolina Panthers", ("Carolina Panthers",)),
        Sample("c", "", "", "Santa Clara", ("Santa Clara", "Levi's Stadium")),
        Sample("d", "", "", "2015", ("2015",)),
    ]
    predictions = [
        "broncos",                 # the second answer: EM 1, F1 1 (against the first: 2/3)
        "the Panthers of Carolina",  # EM 0, F1: 2 of 3 tokens, all of 2 -> 0.8
        "Levi's Stadium, in Santa Clara",  # EM 0, best F1: 2 of 5 tokens, all 2 -> 4/7
        "",                        # EM 0, F1 0
    ]
    em, f1 = squad.official_scores(predictions, samples)
    assert em == pytest.approx(100 * 1 / 4)
    assert f1 == pytest.approx(100 * (1 + 0.8 + 4 / 7 + 0) / 4)


def test_official_scores_need_one_prediction_per_sample() -> None:
    sample = Sample("a", "", "", "x", ("x",))
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        squad.official_scores(["x"], [sample, sample])
    with pytest.raises(ValueError):
        squad.official_scores([], [])


@pytest.mark.parametrize("generated, done", [
    ("", False), ("\n", False), (" \n \n", False), ("Paris", False), ("\nParis", False),
    ("\nParis\n", True), ("Paris\nThe", True), ("  Paris \n", True)])
def test_an_answer_is_complete_once_a_newline_follows_its_text(generated: str, done: bool) -> None:
    assert squad.answered(generated) is done
    if done:  # nothing generated after that point changes what is scored (spaces aside)
        assert squad.answer(generated + "more\ntext").strip() == squad.answer(generated)
