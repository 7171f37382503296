"""The one BPE merge loop every tokenizer kind shares, used to find what a kept token needs.

SentencePiece BPE, tiktoken and Hugging Face BPE all encode a piece of text the same way: start
from its smallest symbols (characters or bytes) and repeatedly merge the adjacent pair of best
priority (SentencePiece: highest score; tiktoken: lowest rank; HF: lowest merge rank), the
leftmost one on ties, until no adjacent pair can merge.

Why this decides which tokens must stay together. Take any text whose encoding with the full
vocabulary V ends in tokens f1..fk. No merge ever crosses the boundary of an fi (tokens never
split), and the merges inside fi's span only see fi's own symbols, so they happen in exactly
the order of the loop run on fi's bytes alone. Hence every token created while encoding the text
is one created by `merge_tree(fi)` for some fi. If the kept vocabulary K contains each fi and
everything its merge tree creates, the loop restricted to K makes the very same choices (each
chosen pair is still available and still the best among the fewer pairs left), so the text
encodes to the same tokens, renumbered. `merge_tree` is that closure: a kept token brings its
tree with it, and a token whose own bytes do not merge back into it can never come out of the
merge loop at all ("unreachable").
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence

Priority = Callable[[object, object], Optional[Hashable]]
"""priority(left, right): the sort key of merging two adjacent symbols (smaller merges first),
or None when they cannot merge."""


def merge_loop(symbols: Sequence, priority: Priority, join=None) -> tuple:
    """Run BPE on `symbols`; return (final symbols, list of symbols created by merges, in order).

    `join(a, b)` builds the merged symbol (default: a + b, for str and bytes).
    """
    join = join or (lambda a, b: a + b)
    syms = list(symbols)
    created = []
    while len(syms) > 1:
        best, best_i = None, -1
        for i in range(len(syms) - 1):
            p = priority(syms[i], syms[i + 1])
            if p is not None and (best is None or p < best):
                best, best_i = p, i
        if best is None:
            break
        merged = join(syms[best_i], syms[best_i + 1])
        syms[best_i:best_i + 2] = [merged]
        created.append(merged)
    return syms, created


def merge_tree(token, symbols: Sequence, priority: Priority, join=None) -> Optional[list]:
    """The symbols the merge loop creates on the way from `symbols` (token's smallest parts) to
    `token`, or None when the loop does not end in exactly `token` (it can never be produced by
    merging). The token itself is not in the list."""
    final, created = merge_loop(symbols, priority, join)
    if len(final) != 1 or final[0] != token:
        return None
    return created[:-1] if created else []
