"""Outputs are snapshots even though the engine does not copy a sequence's token ids each step."""

from jaxdyn.engine.request import CompletionOutput, TokenPrefix


def _output(ids):
    return CompletionOutput(0, "", ids, "", [], None, None, None)


def test_output_token_ids_stay_what_they_were_when_the_output_was_made():
    ids = [5, 6]
    early = _output(TokenPrefix(ids, len(ids)))
    ids += [7, 8]
    late = _output(TokenPrefix(ids, len(ids)))
    assert early.token_ids == [5, 6] and late.token_ids == [5, 6, 7, 8]
    ids.append(9)
    assert early.token_ids == [5, 6] and late.token_ids == [5, 6, 7, 8]


def test_output_token_ids_read_as_a_plain_list_in_repr_and_equality():
    ids = [1, 2, 3]
    lazy = _output(TokenPrefix(ids, 2))
    assert lazy == _output([1, 2])
    assert "token_ids=[1, 2]" in repr(lazy)
    assert type(lazy.token_ids) is list and lazy.token_ids is lazy.token_ids
    lazy.token_ids = [4]
    assert lazy.token_ids == [4]


def test_output_text_stays_what_it_was_when_the_output_was_made():
    """``TextPrefix``: the streamed pieces joined on first read; later pieces do not reach an earlier output;
    ``merge_outputs`` keeps the later output's text without joining it."""
    from jaxdyn.engine.request import RequestOutput, TextPrefix, merge_outputs
    pieces = ["he", "llo"]
    early = CompletionOutput(0, TextPrefix(pieces, 2), [], "llo", [], None, None, None)
    pieces += [" wor", "ld"]
    late = CompletionOutput(0, TextPrefix(pieces, 4), [], "ld", [], None, None, None)
    pieces.append("!")
    assert early.text == "hello" and late.text == "hello world"
    assert early == CompletionOutput(0, "hello", [], "llo", [], None, None, None) and "text='hello'" in repr(early)
    later = CompletionOutput(0, TextPrefix(pieces, 5), [], "!", [], None, None, None)
    merged = merge_outputs(RequestOutput("r", [], [late], False), RequestOutput("r", [], [later], False))
    c = merged.outputs[0]
    assert type(c._text) is TextPrefix and c.delta_text == "ld!" and c.text == "hello world!"


def test_detokenizer_text_is_its_streamed_pieces():
    """The engine's outputs take the detokenizer's streamed pieces (``streamed``), not a copy of its text."""
    from jaxdyn.engine.detokenizer import IncrementalDetokenizer
    from jaxdyn.engine.request import TextPrefix

    class Chars:                      # a tokenizer of one character a token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    d = IncrementalDetokenizer(Chars(), [], stop=["xyz"])
    outs = []
    for ch in "abxyq!":
        d.add(ord(ch))
        d.take_delta(False)
        outs.append(TextPrefix(*d.streamed()))
    # the last two characters are held back (they may start "xyz") until the text is finished
    texts = ["".join(p.pieces[:p.n]) for p in outs]
    assert texts == ["", "", "a", "ab", "abx", "abxy"] and d.text == "abxyq!"
    assert d.take_delta(True) == "q!" and "".join(d.streamed()[0]) == "abxyq!"


def test_pieces_are_joined_every_so_often_without_changing_earlier_outputs():
    from jaxdyn.engine.request import PIECES_KEPT, TextPrefix, append_piece
    pieces, snaps = [], []
    for i in range(3 * PIECES_KEPT + 5):
        pieces = append_piece(pieces, str(i % 10))
        snaps.append(TextPrefix(pieces, len(pieces)))
        assert len(pieces) <= PIECES_KEPT
    whole = "".join(str(i % 10) for i in range(3 * PIECES_KEPT + 5))
    assert ["".join(s.pieces[:s.n]) for s in snaps] == [whole[:i + 1] for i in range(len(whole))]
