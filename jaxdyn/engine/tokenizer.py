"""A checkpoint's tokenizer (``tokenizer.json`` via the ``tokenizers`` library) and its special ids."""

from __future__ import annotations

import functools
import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from jaxdyn.config import ConfigError, generation_config_eos_ids


class TokenizerError(ValueError):
    pass


def _decoder_kinds(tok: _HFTokenizer) -> set[str]:
    """The types of a tokenizer's decoder and of those in its Sequence ("ByteLevel", "ByteFallback", "Metaspace";
    a Replace of "▁" by a space, Llama-2's SentencePiece form, counts as "Metaspace")."""
    try:
        state = json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else {}
    except (AttributeError, TypeError, ValueError):
        return set()
    kinds = set()
    for d in [state, *state.get("decoders", [])]:
        if not isinstance(d, dict):
            continue
        kinds.add(d.get("type"))
        if d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581":
            kinds.add("Metaspace")
    return kinds


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character a byte-level vocabulary writes for each byte -> the
    byte (printable Latin-1 bytes stand for themselves, the others for 256 + their rank)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    return {c: b for b, c in chars.items()}


def _token_str(value, file: str, key: str) -> str | None:
    """A special token's text: a string, an AddedToken serialised as a dict (its ``content``) or absent."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{file}: {key} must be a string or an object with a string content, "
                             f"not {json.dumps(value)[:80]}")
    return value


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as e:      # a directory, unreadable, not UTF-8
        raise TokenizerError(f"{path}: cannot be read: {e}") from None


def _read_json(path: str) -> dict:
    """A side file's object ({} when the file is absent); anything else is a ``TokenizerError`` naming it."""
    if not os.path.exists(path):
        return {}
    try:
        value = json.loads(_read_text(path))
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _chat_template(value, file: str) -> str | None:
    """``chat_template`` as transformers reads it: a string, a list of ``{"name", "template"}`` objects (as it
    writes named templates) or an object of name -> template, of which the one named "default" is used (None where
    none is)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return value.get("default")
    raise TokenizerError(f"{file}: chat_template must be a string, a list of objects with a string name and "
                         f"template, or an object of names to templates")


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 extra_eos_ids: tuple[int, ...] = ()):
        # a tokenizer.json saved after a padded or truncated call keeps those settings, which the tokenizers library
        # then applies to every encode: a batch's prompts padded to its longest, a long prompt silently cut
        # (transformers, as vLLM uses it, turns both off for a prompt); a prompt is its text's tokens, all of them
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        eos = [tok.token_to_id(eos_token)] if eos_token and tok.token_to_id(eos_token) is not None else []
        self.eos_token_ids = tuple(dict.fromkeys([*eos, *extra_eos_ids]))
        self.eos_token_id = eos[0] if eos else None     # the tokenizer's own (tokenizer_config.json's eos_token)
        # its special tokens' texts (what skip_special_tokens leaves out of decoded text)
        self._specials = frozenset(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        kinds = _decoder_kinds(tok)
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        self._metaspace = "Metaspace" in kinds       # SentencePiece's "▁" for a space (or a Replace of it)

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(f"{file}: cannot be read: {e}") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = _read_json(cfg_file)
        try:    # the ids ModelConfig reads of the same file
            extra = generation_config_eos_ids(path)
        except ConfigError as e:
            raise TokenizerError(str(e)) from None
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja):   # transformers: the file wins, whatever tokenizer_config.json holds
            template = _read_text(jinja)
        else:
            template = _chat_template(cfg.get("chat_template"), cfg_file)
        add_bos = cfg.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TokenizerError(f"{cfg_file}: add_bos_token must be true, false or null, not {json.dumps(add_bos)[:80]}")
        return cls(tok, bos_token=_token_str(cfg.get("bos_token"), cfg_file, "bos_token"),
                   eos_token=_token_str(cfg.get("eos_token"), cfg_file, "eos_token"),
                   chat_template=template, add_bos_token=add_bos, extra_eos_ids=extra)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` of each text, the texts encoded in parallel (the tokenizers library's threads): an offline
        batch of 1,000 ShareGPT-sized prompts took 0.11 s against 0.21 s one by one on 2 cores."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def is_special(self, text: str) -> bool:
        """Whether ``text`` is one of the tokenizer's special tokens (left out of decoded text by
        ``skip_special_tokens``)."""
        return text in self._specials

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_text(self, i: int) -> str:
        """Token ``i``'s text alone (a logprob entry's ``token``): decoded by itself, with the leading spaces a
        SentencePiece decoder strips from a text's first token put back (vLLM's), so that " world" and "world"
        stay apart. A byte-level piece of part of a character decodes to U+FFFD, as vLLM shows it."""
        text = self._tok.decode([i], skip_special_tokens=False)
        if self._metaspace and i not in self._added:
            piece = self._tok.id_to_token(i) or ""
            lead = len(piece) - len(piece.lstrip("\u2581"))
            have = len(text) - len(text.lstrip(" "))
            if lead > have:
                text = " " * (lead - have) + text
        return text

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for in decoded text (OpenAI's logprob ``bytes``, which exist for tokens
        that hold part of a character): a byte-level vocabulary's piece mapped back to its bytes, a byte-fallback
        piece (``<0xC3>``) its byte, a SentencePiece piece with its "▁" as spaces; an added token's text."""
        if i in self._added:            # as decoded (a decoder may rewrite its text, e.g. a leading "▁")
            return self.token_text(i).encode()
        piece = self._tok.id_to_token(i)
        if piece is None:
            return self.token_text(i).encode()
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if self._byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if self._metaspace:
            return piece.replace("\u2581", " ").encode()
        return self.token_text(i).encode()

    def token_to_id(self, t: str) -> int | None:
        return self._tok.token_to_id(t)
