"""Tokenizing only the text a request adds: a rendered prompt, split at the template's special tokens.

An agent sends the same text again and again: every request repeats the system prompt, the tool
list and the whole history, and adds a message or two. A chat template writes each message
between special tokens (``<|im_start|>`` ... ``<|im_end|>``), and a fast tokenizer splits its input
at its added tokens *before* anything else: the text between two of them is tokenized on its
own, whatever comes before or after. So the token IDs of a prompt are the IDs of its pieces, in
order, and a piece's IDs depend on the piece's text alone: a cache keyed by that text gives
exactly the IDs that tokenizing the whole prompt gives, and each request costs the tokenizer
only its new pieces.

"Exactly" holds by construction where the tokenizer really splits at its added tokens and
treats every piece alike. Some do not: an added token that strips the spaces around it
(``lstrip``/``rstrip``) or must stand as a whole word, or a normalizer or pre-tokenizer that
treats the start of the input differently (SentencePiece's ``prepend_scheme="first"``). Such a
tokenizer is not split at all (``PieceTokenizer.reason`` says why), and every tokenizer is
checked against whole tokenization on a sample of prompts (the first few, then as many as keep
the tokens checked at ``CHECK_SHARE`` of the tokens seen: a check costs what tokenizing the whole
prompt costs): a difference switches the splitting off for the rest of the run, with a note.

The cache is bounded: least recently used pieces go first once it holds more than
``budget_tokens`` tokens.
"""

from __future__ import annotations

import bisect
import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.prefix import common_prefix_len

CHECK_FIRST = 8  # prompts checked against whole tokenization at the start
CHECK_SHARE = 1 / 200  # then prompts are checked while fewer than this share of all tokens were
DEFAULT_BUDGET_TOKENS = 4_000_000  # about 50 MB of cached pieces


@dataclass(frozen=True)
class _Piece:
    ids: array[int]
    starts: array[int]  # per token, its character span in the piece (special tokens: (0, 0))
    ends: array[int]


class Offsets(Sequence[tuple[int, int]]):
    """Per token, its character span in the prompt (what ``return_offsets_mapping`` gives), kept
    as the pieces it came from: a long prompt has tens of thousands of tokens and a few hundred
    pieces, and the explainer asks for one or two offsets per request."""

    def __init__(self, pieces: Sequence[_Piece], first_tokens: array[int], first_chars: array[int]) -> None:
        self._pieces = pieces
        self._first_tokens = first_tokens  # per piece, the index of its first token
        self._first_chars = first_chars  # per piece, the offset of its first character
        self._length = first_tokens[-1] + len(pieces[-1].ids) if pieces else 0

    @classmethod
    def whole(cls, piece: _Piece) -> Offsets:
        return cls([piece], array("i", [0]), array("i", [0]))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        p = bisect.bisect_right(self._first_tokens, index) - 1
        piece, local = self._pieces[p], index - self._first_tokens[p]
        start, end = piece.starts[local], piece.ends[local]
        if (start, end) == (0, 0):  # a special token, as the fast tokenizer reports it
            return (0, 0)
        return (start + self._first_chars[p], end + self._first_chars[p])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(tuple(a) == tuple(b) for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Split:
    """A prompt as its pieces: what the next prompt of the same conversation starts from."""

    text: str
    ids: array[int]
    offsets: Offsets
    ends: array[int]  # per piece, the character offset just past it
    specials: bytearray  # per piece, 1 for a special token (a place where pieces always split)


def _unsplittable(tokenizer: Any) -> str | None:
    """Why pieces of this tokenizer may not tokenize as the whole does (None: they do)."""
    if not getattr(tokenizer, "is_fast", False):
        return "not a fast tokenizer"
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if added.lstrip or added.rstrip or added.single_word:
            return f"the added token {added.content!r} strips spaces or must be a whole word"
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:
        return "its tokenizer.json cannot be read"
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"prepend_scheme": "first"' in text:
        return "its pre-tokenizer treats the start of the input differently (prepend_scheme first)"
    return None


class PieceTokenizer:
    """``tokenize(text)``: the IDs and offsets of ``text``, tokenizing only pieces not seen lately."""

    def __init__(
        self, tokenizer: Any, budget_tokens: int = DEFAULT_BUDGET_TOKENS, split: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.budget_tokens = budget_tokens
        # None: split at the added tokens
        self.reason = _unsplittable(tokenizer) if split else "asked to tokenize every prompt whole"
        added = sorted(
            {a.content for a in getattr(tokenizer, "added_tokens_decoder", {}).values() if a.content},
            key=len,
            reverse=True,
        )
        self._split = re.compile("(" + "|".join(re.escape(a) for a in added) + ")") if added else None
        self._cache: OrderedDict[str, _Piece] = OrderedDict()
        self._cached_tokens = 0
        self.prompts = 0
        self.tokens_seen = 0
        self.tokens_checked = 0
        self.pieces_tokenized = 0
        self.pieces_reused = 0

    @property
    def splitting(self) -> bool:
        return self.reason is None and self._split is not None

    def _whole(self, text: str) -> _Piece:
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        return _Piece(
            array("i", encoding["input_ids"]),
            array("i", (s for s, _ in offsets)),
            array("i", (e for _, e in offsets)),
        )

    def _piece(self, text: str) -> _Piece:
        piece = self._cache.get(text)
        if piece is not None:
            self._cache.move_to_end(text)
            self.pieces_reused += 1
            return piece
        piece = self._whole(text)
        self.pieces_tokenized += 1
        self._cache[text] = piece
        self._cached_tokens += len(piece.ids)
        while self._cached_tokens > self.budget_tokens and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old.ids)
        return piece

    def _split_tokenize(self, text: str, previous: Split | None = None) -> Split:
        """``text`` as its pieces, each tokenized once (``_piece``). With ``previous`` (the
        prompt this one repeats and extends: the same conversation's last request), its pieces
        up to the last special token the two texts share are taken as they are, not even looked
        up: only the text after that is split."""
        assert self._split is not None
        ids: array[int] = array("i")
        pieces: list[_Piece] = []
        first_tokens: array[int] = array("i")
        first_chars: array[int] = array("i")
        ends: array[int] = array("i")
        specials = bytearray()
        at = 0
        if previous is not None:
            common = common_prefix_len(text, previous.text)
            # A special token both texts have at the same place ends a piece in both: after it,
            # splitting the rest of this text goes as splitting it whole would.
            keep = bisect.bisect_right(previous.ends, common)
            while keep and not previous.specials[keep - 1]:
                keep -= 1
            if keep:
                shared = previous.offsets
                pieces = list(shared._pieces[:keep])
                first_tokens = shared._first_tokens[:keep]
                first_chars = shared._first_chars[:keep]
                ends, specials = previous.ends[:keep], previous.specials[:keep]
                at = ends[-1]
                ids = previous.ids[: first_tokens[-1] + len(pieces[-1].ids)]
        for index, part in enumerate(self._split.split(text[at:] if at else text)):
            if part:
                piece = self._piece(part)
                pieces.append(piece)
                first_tokens.append(len(ids))
                first_chars.append(at)
                ids.extend(piece.ids)
                at += len(part)
                ends.append(at)
                specials.append(index % 2)  # split() puts the separators at odd places
        return Split(text, ids, Offsets(pieces, first_tokens, first_chars), ends, specials)

    def tokenize(
        self, text: str, previous: Split | None = None
    ) -> tuple[list[int], Offsets, str | None, Split | None]:
        """``(ids, offsets, note, split)``; ``note`` says when the pieces disagreed with the
        whole and splitting was switched off (the IDs returned are then the whole
        tokenization's); ``split`` can be passed as ``previous`` for the next prompt of the same
        conversation."""
        self.prompts += 1
        if not self.splitting:
            whole = self._whole(text)
            return whole.ids.tolist(), Offsets.whole(whole), None, None
        split = self._split_tokenize(text, previous)
        ids, offsets = split.ids, split.offsets
        self.tokens_seen += len(ids)
        if self.prompts <= CHECK_FIRST or self.tokens_checked < CHECK_SHARE * self.tokens_seen:
            self.tokens_checked += len(ids)
            whole = self._whole(text)
            if ids != whole.ids or offsets != Offsets.whole(whole):
                self.reason = "its pieces tokenized differently from the whole prompt (checked on a sample)"
                self._cache.clear()
                self._cached_tokens = 0
                note = f"tokenizing piece by piece was switched off: {self.reason}"
                return whole.ids.tolist(), Offsets.whole(whole), note, None
        return ids.tolist(), offsets, None, split
