"""Incremental detokenization and stop strings.

Text is produced a token at a time by decoding a short window
``tokens[prefix:]`` and keeping what it adds beyond ``tokens[prefix:read]``:
a token that ends inside a multi-byte character decodes to U+FFFD and is held
until the character completes; the window starts on the last few prompt tokens
so a leading space of the first output token survives SentencePiece decoding.

The same algorithm runs in Rust when the ``tokenizers`` library has it
(``tokenizers.decoders.DecodeStream``, one call a token instead of two
decodes of the window: 4.3 -> 1.0 us a token on the CPU here). It is primed
by stepping through the prompt's last tokens, and is used only when those
decode to whole characters (otherwise the prompt's last character would be
completed by the first output token, which the window above does not emit);
the Python window keeps the same offsets alongside, so a stream that fails
falls back to it mid-way, and ``flush`` is the same for both.

Stop strings are searched in the text as it grows, so a stop string split
over several tokens is found. While a sequence runs, the last
``len(longest stop) - 1`` characters are held back from the stream, so no
client ever sees the beginning of a stop string that then matches.
"""

from __future__ import annotations

from jaxdyn.engine.request import append_piece
from jaxdyn.engine.tokenizer import Tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:            # tokenizers < 0.21: the Python window only
    DecodeStream = None

_PROMPT_CONTEXT = 5
_PROMPT_CONTEXT_MAX = 24


def _prompt_context(tokenizer: Tokenizer, prompt_ids, skip: bool) -> tuple[list[int], str | None]:
    """The prompt's last tokens the window starts on, and their text where it was decoded to choose them: the
    fewest (5 to 24) that decode without U+FFFD (vLLM's choice). A window that starts inside a character the prompt
    spelled in several tokens (a byte-fallback emoji) decodes it as U+FFFD, and a SentencePiece byte-fallback
    decoder then turns the first output character spelled in bytes into U+FFFD too. None clean: the last 5 (the
    prompt itself is not valid text there)."""
    prompt_ids = list(prompt_ids)
    if len(prompt_ids) <= _PROMPT_CONTEXT:
        return prompt_ids, None
    first = None
    for n in range(_PROMPT_CONTEXT, min(len(prompt_ids), _PROMPT_CONTEXT_MAX) + 1):
        tail = prompt_ids[-n:]
        text = tokenizer.decode(tail, skip_special_tokens=skip)
        if "\ufffd" not in text:
            return tail, text
        first = text if first is None else first
    return prompt_ids[-_PROMPT_CONTEXT:], first


def _stream(tokenizer: Tokenizer, raw, context: list[int], skip: bool, text: str | None = None):
    """A DecodeStream over ``raw`` (the ``tokenizers`` object inside ``tokenizer``) primed on ``context``
    (whose text, ``text`` if already decoded, is not emitted), or None where it cannot stand in for the Python
    window (no DecodeStream, no raw tokenizer, a context that ends inside a character)."""
    if DecodeStream is None or raw is None or not hasattr(raw, "decode"):
        return None
    try:
        if text is None:
            text = tokenizer.decode(context, skip_special_tokens=skip)
        if text.endswith("\ufffd"):
            return None
        stream = DecodeStream(skip_special_tokens=skip)
        for t in context:
            stream.step(raw, t)
        return stream
    except Exception:  # noqa: BLE001 -- any failure: the Python window
        return None


class IncrementalDetokenizer:
    """``lazy``: no text until ``flush``, which decodes every token since the prompt in one call (the
    window's algorithm over the whole output: the same text); for output read only at its end, with no
    stop strings (ValueError with them: they are searched as the text grows).

    The text is kept as the pieces already streamed (``take_delta``), joined only when ``text`` is read, and
    the tail after them: appending a token's text copies the tail, not the whole output (a string attribute
    grown by ``+=`` is copied on every append: quadratic in the output's length)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids, *, skip_special_tokens: bool = True,
                 stop: list[str] = (), include_stop_str_in_output: bool = False, lazy: bool = False):
        if lazy and stop:
            raise ValueError("a lazy detokenizer cannot search stop strings")
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.tokens, context_text = _prompt_context(tokenizer, prompt_ids, skip_special_tokens)
        self.prefix = 0
        self.read = len(self.tokens)
        self._done: list[str] = []   # text streamed and out of reach of a stop string, in pieces
        self._done_len = 0
        self._tail = ""              # the text after those pieces
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0           # characters of text already streamed
        self.stopped_by: str | None = None
        self._raw = getattr(tokenizer, "_tok", None)
        self.lazy = lazy
        self._stream = None if lazy else _stream(tokenizer, self._raw, self.tokens, skip_special_tokens,
                                                 context_text)

    def streamed(self) -> tuple[list[str], int]:
        """(a list that only grows at its end, n): its first n pieces are the text ``take_delta`` has returned
        (``request.TextPrefix``'s arguments; the list is not copied)."""
        return self._done, len(self._done)

    @property
    def text(self) -> str:
        """All text so far."""
        if len(self._done) > 1:
            self._done = ["".join(self._done)]
        return (self._done[0] if self._done else "") + self._tail

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add a token; returns the stop string that matched, if one did (text is then cut)."""
        tokens = self.tokens
        tokens.append(token_id)
        if self.lazy:
            return None
        stream = self._stream
        delta = None
        if stream is not None:
            try:
                delta = stream.step(self._raw, token_id)
            except Exception:  # noqa: BLE001 -- the Python window takes over from here (same offsets)
                self._stream = stream = None
            if stream is not None and delta is None:
                return None
        if delta is None:
            decode, skip = self.tok.decode, self.skip
            prefix_text = decode(tokens[self.prefix:self.read], skip_special_tokens=skip)
            new_text = decode(tokens[self.prefix:], skip_special_tokens=skip)
            if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
                return None
            delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.tokens)
        before = len(self._tail)
        self._tail += delta
        if self.stop and check_stop:
            return self._search_stop(before)
        return None

    def _search_stop(self, before: int) -> str | None:
        """The stop string that ends in the tail after its first ``before`` characters, if one does (the text is
        then cut there)."""
        # a stop string ending in the new text starts at most len(s) - 1 characters before it (one wholly in the
        # text before was either looked for there or, under min_tokens, must not end the request: vLLM's search);
        # the streamed pieces end at or before that point (take_delta holds back the longest's length - 1)
        best = None
        for s in self.stop:
            i = self._tail.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self._tail = self._tail[:i + len(s)] if self.include_stop else self._tail[:i]
        self.stopped_by = s
        return s

    def flush(self, check_stop: bool = False) -> str:
        """At the end: decode whatever is still held (an incomplete character decodes as U+FFFD). ``check_stop``:
        a stop string that the held text completes ends the text there too (``stopped_by`` then names it)."""
        if self.stopped_by is None and self.read < len(self.tokens):
            prefix_text = self._decode(self.tokens[self.prefix:self.read])
            new_text = self._decode(self.tokens[self.prefix:])
            before = len(self._tail)
            self._tail += new_text[len(prefix_text):]
            self.prefix = self.read = len(self.tokens)
            if self.stop and check_stop:
                self._search_stop(before)
        return self.text

    def take_delta(self, finished: bool) -> str:
        """New text to stream since the last call (holding back a possible stop-string start)."""
        total = self._done_len + len(self._tail)
        end = total if finished else max(self.emitted, total - self.holdback)
        k = end - self._done_len
        delta = self._tail[self.emitted - self._done_len:k]
        self.emitted = end
        if k > 0:                      # streamed: out of reach of a stop string from now on
            self._done = append_piece(self._done, self._tail[:k])
            self._tail = self._tail[k:]
            self._done_len = end
        return delta
