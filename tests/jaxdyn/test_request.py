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
