"""A token's own text and bytes (``Tokenizer.token_text`` / ``token_bytes``), what logprob entries show: byte-level,
SentencePiece (Metaspace) and Llama-2-style (a Replace of "▁" with byte fallback) vocabularies."""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from jaxdyn.engine.tokenizer import Tokenizer
from serving.app import _chat_logprobs, _completion_logprobs
from tests.support import make_byte_tokenizer


class LP:
    def __init__(self, logprob, rank):
        self.logprob, self.rank = logprob, rank


def test_a_byte_level_token_of_part_of_a_character_has_its_own_byte(tmp_path):
    tok = Tokenizer.from_pretrained(make_byte_tokenizer(str(tmp_path)))
    ids = tok.encode("é!", add_special_tokens=False)
    assert ids == [195, 169, 33]
    assert [tok.token_bytes(i) for i in ids] == [b"\xc3", b"\xa9", b"!"]
    assert tok.token_text(195) == "\ufffd" and tok.token_text(33) == "!"       # shown as vLLM shows it
    assert tok.token_bytes(256) == b"<s>" and tok.token_text(256) == "<s>"     # an added token: its text
    # chat logprobs' bytes: the token's own (they were U+FFFD's three bytes for both halves of "é")
    lps = [{195: LP(-0.1, 1), 169: LP(-2.0, 2)}, {169: LP(-0.2, 1)}, {33: LP(-0.3, 1)}]
    content = _chat_logprobs(tok, ids, lps, top_n=2)["content"]
    assert [c["bytes"] for c in content] == [[195], [169], [33]]
    assert [t["bytes"] for t in content[0]["top_logprobs"]] == [[195], [169]]
    assert bytes(b for c in content for b in c["bytes"]).decode() == "é!"


def _metaspace(decoder):
    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "\u2581w": 3, "w": 4, "<0xC3>": 5, "<0xA9>": 6}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.decoder = decoder
    return Tokenizer(hf)


def test_sentencepiece_tokens_keep_their_leading_space():
    """A SentencePiece decoder strips the space of a text's first token, so a token decoded alone lost it: " world"
    showed as "world" (and its text_offset and bytes with it), and " w" and "w" shared one top_logprobs key."""
    for decoder in (decoders.Metaspace(prepend_scheme="first"),
                    decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])):
        tok = _metaspace(decoder)
        assert tok.decode([1, 2]) == "Hello world"
        assert [tok.token_text(i) for i in (1, 2, 3, 4)] == [" Hello", " world", " w", "w"]
        assert tok.token_bytes(2) == b" world" and tok.token_bytes(4) == b"w"
        lps = [{1: LP(-0.1, 1)}, {2: LP(-0.1, 1), 3: LP(-2.0, 2), 4: LP(-3.0, 3)}]
        got, end = _completion_logprobs(tok, [1, 2], lps, 0)
        assert got["tokens"] == [" Hello", " world"] and got["text_offset"] == [0, 6] and end == 12
        assert got["top_logprobs"][1] == {" world": -0.1, " w": -2.0, "w": -3.0}
    # byte fallback: a piece <0xC3> is that byte
    tok = _metaspace(decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)]))
    assert tok.token_bytes(5) == b"\xc3" and tok.token_bytes(6) == b"\xa9" and tok.decode([5, 6]) == "é"
