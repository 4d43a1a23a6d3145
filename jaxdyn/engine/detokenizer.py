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

from jaxdyn.engine.tokenizer import Tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:            # tokenizers < 0.21: the Python window only
    DecodeStream = None

_PROMPT_CONTEXT = 5


def _stream(tokenizer: Tokenizer, raw, context: list[int], skip: bool):
    """A DecodeStream over ``raw`` (the ``tokenizers`` object inside ``tokenizer``) primed on ``context``
    (whose text is not emitted), or None where it cannot stand in for the Python window (no DecodeStream,
    no raw tokenizer, a context that ends inside a character)."""
    if DecodeStream is None or raw is None or not hasattr(raw, "decode"):
        return None
    try:
        if tokenizer.decode(context, skip_special_tokens=skip).endswith("\ufffd"):
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
    stop strings (ValueError with them: they are searched as the text grows)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids, *, skip_special_tokens: bool = True,
                 stop: list[str] = (), include_stop_str_in_output: bool = False, lazy: bool = False):
        if lazy and stop:
            raise ValueError("a lazy detokenizer cannot search stop strings")
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.tokens = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.tokens)
        self.text = ""
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0           # characters of text already streamed
        self.stopped_by: str | None = None
        self._raw = getattr(tokenizer, "_tok", None)
        self.lazy = lazy
        self._stream = None if lazy else _stream(tokenizer, self._raw, self.tokens, skip_special_tokens)

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
        before = len(self.text)
        self.text += delta
        if self.stop and check_stop:
            start = max(0, before - self.holdback)
            best = None
            for s in self.stop:
                i = self.text.find(s, start)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, s = best
                self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
                self.stopped_by = s
                return s
        return None

    def flush(self) -> str:
        """At the end: decode whatever is still held (an incomplete character decodes as U+FFFD)."""
        if self.stopped_by is None and self.read < len(self.tokens):
            prefix_text = self._decode(self.tokens[self.prefix:self.read])
            new_text = self._decode(self.tokens[self.prefix:])
            self.text += new_text[len(prefix_text):]
            self.prefix = self.read = len(self.tokens)
        return self.text

    def take_delta(self, finished: bool) -> str:
        """New text to stream since the last call (holding back a possible stop-string start)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
