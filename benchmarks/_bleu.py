"""Corpus BLEU (Papineni et al., 2002), as defined there.

nltk's ``corpus_bleu`` agrees when every hypothesis has at least N tokens; for shorter ones
nltk counts at least one n-gram per hypothesis in the denominator where this counts the
real number (0), so the two differ (e.g. hypotheses ``abcd``, ``ab``: 1.0 here, 0.76 in
nltk). The benchmark's captions are 18-21 characters, where both agree.

For n = 1..N, the modified precision p_n = (sum over hypotheses of the n-gram counts clipped
by the maximum count in any of its references) / (sum of the hypothesis n-gram counts).
BLEU = BP * exp(sum_n w_n log p_n) with uniform weights w_n = 1/N, and the brevity penalty
BP = 1 if c > r else exp(1 - r / c), where c is the total hypothesis length and r the sum of
the reference lengths closest to each hypothesis length (ties to the shorter one).
Without smoothing a zero p_n gives BLEU 0; ``smooth=True`` adds ``epsilon`` to zero
numerators (Chen & Cherry 2014, method 1).

Tokens are any hashable items: characters for Chinese captions (``list("...")``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, List, Sequence, Tuple

__all__ = ["corpus_bleu", "ngram_stats"]


def _ngrams(tokens: Sequence[Hashable], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def ngram_stats(hypothesis: Sequence[Hashable], references: Sequence[Sequence[Hashable]], n: int) -> Tuple[int, int]:
    """``(clipped matches, hypothesis n-grams)`` of one hypothesis for order ``n``."""
    counts = _ngrams(hypothesis, n)
    max_ref: Counter = Counter()
    for ref in references:
        for gram, c in _ngrams(ref, n).items():
            max_ref[gram] = max(max_ref[gram], c)
    matches = sum(min(c, max_ref[gram]) for gram, c in counts.items())
    return matches, max(len(hypothesis) - n + 1, 0)


def corpus_bleu(hypotheses: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Sequence[Hashable]]],
                max_n: int = 4, *, smooth: bool = False, epsilon: float = 0.1) -> float:
    """Corpus-level BLEU-``max_n`` in [0, 1].

    Args:
        hypotheses: one token list per segment.
        references: per segment, a list of reference token lists.

    Examples:
        >>> corpus_bleu([list("abcd")], [[list("abcd")]])
        1.0
        >>> round(corpus_bleu([list("abcx")], [[list("abcd")]], max_n=2), 4)  # p1 = 3/4, p2 = 2/3
        0.7071
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: expected as many reference lists as hypotheses, got "
                         f"{len(references)} and {len(hypotheses)}")
    matches: List[int] = [0] * max_n
    totals: List[int] = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        if not refs:
            raise ValueError("corpus_bleu: expected at least one reference per hypothesis")
        for n in range(1, max_n + 1):
            m, t = ngram_stats(hyp, refs, n)
            matches[n - 1] += m
            totals[n - 1] += t
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:
            if not smooth:
                return 0.0
            m = epsilon
        log_p += math.log(m / t) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)
