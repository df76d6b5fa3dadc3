import pytest

from lessctl.summarize import build_prompt, clean, rouge


def test_prompt_format():
    p = build_prompt([("Doc one.", "Sum one.")], "Doc two.")
    assert p == "###\nArticle: Doc one.\n\nSummary: Sum one.\n\n###\nArticle: Doc two.\n\nSummary:"


def test_rouge_known_strings():
    [same] = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    [part] = rouge(["the cat"], ["the cat sat"])
    # unigrams: P = 2/2, R = 2/3 -> F = 0.8; bigrams: P = 1/1, R = 1/2 -> F = 2/3
    assert part["rouge1"] == pytest.approx(0.8)
    assert part["rouge2"] == pytest.approx(2 / 3)
    [none] = rouge(["dog"], ["the cat"])
    assert none["rouge1"] == 0.0


def test_clean_stops_at_separator():
    assert clean(" A summary.\n\n###\nArticle: next") == "A summary."
