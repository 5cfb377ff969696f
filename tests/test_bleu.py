"""BLEU-4 of benchmarks/_bleu.py against numbers computed by hand (Papineni et al. 2002)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _bleu import corpus_bleu, ngram_stats  # noqa: E402


def test_identical_is_one():
    assert corpus_bleu([list("今天天气很好")], [[list("今天天气很好")]]) == 1.0


def test_hand_computed_example_with_clipping_and_brevity_penalty():
    # Papineni's "the the the ..." clipping example: p1 = 2/7 (count of "the" clipped to 2).
    hyp = "the the the the the the the".split()
    refs = ["the cat is on the mat".split(), "there is a cat on the mat".split()]
    assert ngram_stats(hyp, refs, 1) == (2, 7)
    # A two-segment corpus, worked out by hand:
    # seg 1 hyp "a b c d e" vs ref "a b c d f g": 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2
    # seg 2 hyp "x y z w"   vs ref "x y z w":     1-grams 4/4, 2-grams 3/3, 3-grams 2/2, 4-grams 1/1
    # corpus p_n = 8/9, 6/7, 4/5, 2/3; c = 9, r = 6 + 4 = 10 -> BP = exp(1 - 10/9)
    hyps = [list("abcde"), list("xyzw")]
    refs = [[list("abcdfg")], [list("xyzw")]]
    expected = math.exp(1 - 10 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert corpus_bleu(hyps, refs) == pytest.approx(expected, rel=1e-12)
    # (384 / 945) ** 0.25 = 0.798404, exp(-1/9) = 0.894839
    assert round(expected, 6) == 0.714447


def test_closest_reference_length_and_no_match():
    # two references of lengths 3 and 6 for a hypothesis of length 5: r = 6 (|6-5| < |3-5|)
    hyp = list("abcde")
    refs = [[list("abc"), list("abcdeq")]]
    expected = math.exp(1 - 6 / 5) * 1.0
    assert corpus_bleu([hyp], refs) == pytest.approx(expected)
    assert corpus_bleu([list("ab")], [[list("cd")]]) == 0.0
    assert corpus_bleu([list("abcx")], [[list("abcd")]], smooth=True) > 0.0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="as many reference lists"):
        corpus_bleu([list("a")], [])
