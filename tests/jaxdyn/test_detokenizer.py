"""Incremental detokenization: multi-byte characters and stop strings split across tokens."""

import pytest

from jaxdyn.engine.detokenizer import IncrementalDetokenizer
from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
from tests.support import make_byte_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(make_byte_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def stream(tok, text, **kw):
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [256], **kw)
    pieces, stop = [], None
    for i in ids:
        stop = d.add(i)
        pieces.append(d.take_delta(stop is not None))
        if stop is not None:
            break
    d.flush()
    pieces.append(d.take_delta(True))
    return d, pieces, stop


def test_multibyte_characters_split_across_tokens(tok):
    text = "añb€c😀d"
    d, pieces, _ = stream(tok, text)
    assert "".join(pieces) == text == d.text
    assert all("\ufffd" not in p for p in pieces)
    # '€' is three byte tokens: nothing appears until its last byte arrives.
    ids = tok.encode("€", add_special_tokens=False)
    assert len(ids) == 3
    d = IncrementalDetokenizer(tok, [256])
    assert [d.add(i) or d.take_delta(False) for i in ids] == ["", "", "€"]


def test_stop_string_split_across_tokens_is_cut_and_never_streamed(tok):
    d, pieces, stop = stream(tok, "hello STOP world", stop=["STOP"])
    assert stop == "STOP" and d.text == "hello "
    assert "".join(pieces) == "hello " and not any("S" in p for p in pieces)
    d, pieces, stop = stream(tok, "hello STOP world", stop=["STOP"], include_stop_str_in_output=True)
    assert d.text == "hello STOP" == "".join(pieces)


def test_stop_string_made_of_multibyte_characters(tok):
    d, pieces, stop = stream(tok, "x€y€€z", stop=["€€"])
    assert stop == "€€" and d.text == "x€y" == "".join(pieces)


def test_earliest_stop_string_wins_and_partial_match_is_released(tok):
    d, pieces, stop = stream(tok, "abcdef", stop=["cdx", "ef"])
    assert stop == "ef" and d.text == "abcd" == "".join(pieces)


def test_an_unfinished_character_at_the_end_is_flushed(tok):
    ids = tok.encode("ok€", add_special_tokens=False)[:-1]
    d = IncrementalDetokenizer(tok, [256])
    for i in ids:
        d.add(i)
    assert d.text == "ok"
    assert d.flush().startswith("ok") and len(d.text) > 2


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def _deltas(d, ids):
    out = []
    for i in ids:
        d.add(i, check_stop=False)
        out.append(d.take_delta(False))
    d.flush()
    out.append(d.take_delta(True))
    return out


@pytest.mark.parametrize("which", ["bytes", "demo"])
def test_the_rust_stream_and_the_python_window_emit_the_same_deltas(tok, which):
    """Random token streams (invalid UTF-8 among them) after random prompts: the DecodeStream path, the
    Python window, and a stream that fails mid-way and hands over to the window all emit the same pieces."""
    import random

    from jaxdyn.engine import detokenizer as dt
    if dt.DecodeStream is None:
        pytest.skip("tokenizers has no DecodeStream")
    t = tok if which == "bytes" else Tokenizer.from_pretrained("checkpoints/demo")
    rng = random.Random(0)
    used = 0

    class Failing:
        def __init__(self, inner, after):
            self.inner, self.after = inner, after

        def step(self, raw, i):
            self.after -= 1
            if self.after < 0:
                raise RuntimeError("decode stream failed")
            return self.inner.step(raw, i)

    for _ in range(150):
        prompt = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 40))]
        fast = IncrementalDetokenizer(t, prompt)
        slow = IncrementalDetokenizer(t, prompt)
        slow._stream = None
        failing = IncrementalDetokenizer(t, prompt)
        if failing._stream is not None:
            failing._stream = Failing(failing._stream, rng.randrange(len(ids)))
        used += fast._stream is not None
        expect = _deltas(slow, ids)
        assert _deltas(fast, ids) == expect and _deltas(failing, ids) == expect
    assert used > 50        # the Rust path ran (a prompt ending inside a character keeps the window)


@pytest.mark.parametrize("which", ["bytes", "demo"])
def test_a_lazy_detokenizer_ends_with_the_incremental_text(tok, which):
    """``lazy`` (output read once, at its end): no text until flush, then the same text the incremental
    detokenizer built token by token, for random streams (invalid UTF-8 among them) after random prompts."""
    import random
    t = tok if which == "bytes" else Tokenizer.from_pretrained("checkpoints/demo")
    rng = random.Random(1)
    for _ in range(150):
        prompt = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 40))]
        eager, lazy = IncrementalDetokenizer(t, prompt), IncrementalDetokenizer(t, prompt, lazy=True)
        for i in ids:
            assert eager.add(i) is None and lazy.add(i) is None
        assert lazy.text == "" and lazy.take_delta(False) == ""
        assert lazy.flush() == eager.flush(), (prompt, ids)
        assert lazy.take_delta(True) == eager.text
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(t, [1], stop=["x"], lazy=True)


def test_streamed_text_matches_cutting_the_whole_text_at_the_first_stop(tok):
    """The detokenizer keeps what it streamed as pieces and searches only the tail: on random texts over a
    small alphabet (stop strings occur, overlap, straddle tokens) it streams exactly the whole text cut where
    a stop string first completes, and ``text`` is that too."""
    import random
    rng = random.Random(0)
    for trial in range(300):
        text = "".join(rng.choice("abc€ ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abc€") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        include = rng.random() < 0.5
        ids = tok.encode(text, add_special_tokens=False)
        want, want_stop = text, None
        for k in range(1, len(ids) + 1):           # the text after each token; the first stop to complete
            t = tok.decode(ids[:k])
            if t.endswith("\ufffd"):
                continue
            found = [(t.find(s), s) for s in stops if s in t]
            if found:
                i, s = min(found)
                want, want_stop = (t[:i + len(s)] if include else t[:i]), s
                break
        d, pieces, stop = stream(tok, text, stop=stops, include_stop_str_in_output=include)
        assert (stop, "".join(pieces), d.text) == (want_stop, want, want), (trial, text, stops, include)


def test_chat_template_jinja_wins_over_tokenizer_configs_as_in_transformers(tmp_path):
    import json

    from jaxdyn.engine.tokenizer import Tokenizer
    from tests.support import make_byte_tokenizer
    make_byte_tokenizer(str(tmp_path), chat_template="CONFIG")
    assert Tokenizer.from_pretrained(str(tmp_path)).chat_template == "CONFIG"
    (tmp_path / "chat_template.jinja").write_text("JINJA:{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(str(tmp_path)).chat_template.startswith("JINJA:")
    assert json.load(open(tmp_path / "tokenizer_config.json"))["chat_template"] == "CONFIG"


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
    ("tokenizer_config.json", '{"bos_token": "<s>",', "not valid JSON"),
    ("tokenizer_config.json", "[" * 5000 + "]" * 5000, "not valid JSON"),
    ("tokenizer_config.json", '{"chat_template": [1, "x"]}', "chat_template must be"),
    ("tokenizer_config.json", '{"chat_template": 7}', "chat_template must be"),
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token must be a string"),
    ("tokenizer_config.json", '{"eos_token": ["a"]}', "eos_token must be a string"),
    ("tokenizer_config.json", '{"eos_token": {"content": 3}}', "eos_token must be a string"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token must be"),
    ("generation_config.json", '{"eos_token_id": "2"}', "eos_token_id must be"),
    ("generation_config.json", '{"eos_token_id": [2, null]}', "eos_token_id must be"),
    ("generation_config.json", '{"eos_token_id": true}', "eos_token_id must be"),
    ("tokenizer_config.json", '{"chat_template": {"default": 3}}', "chat_template must be"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "cannot be read"),
    ("chat_template.jinja", None, "cannot be read"),          # a directory
    ("tokenizer_config.json", None, "cannot be read"),
])
def test_a_malformed_side_file_is_a_tokenizer_error_naming_it(tmp_path, file, content, message):
    """The tokenizer's side files as the loader, ``convert`` and ``bench`` read them: what transformers would not
    take is a ``TokenizerError`` naming the file (the CLI's message), not an AttributeError or TypeError."""
    from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
    from tests.support import make_byte_tokenizer
    make_byte_tokenizer(str(tmp_path))
    path = tmp_path / file
    if path.exists():
        path.unlink()
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert str(path) in str(e.value) and message in str(e.value), e.value


def test_the_side_files_forms_transformers_writes_are_read(tmp_path):
    import json

    from jaxdyn.engine.tokenizer import Tokenizer
    from tests.support import make_byte_tokenizer
    make_byte_tokenizer(str(tmp_path))
    cfg = tmp_path / "tokenizer_config.json"
    json.dump({**json.load(open(cfg)), "eos_token": {"content": "</s>", "special": True}, "bos_token": None,
               "add_bos_token": False, "chat_template": [{"name": "tool_use", "template": "T"},
                                                          {"name": "default", "template": "D"}]}, open(cfg, "w"))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.chat_template, tok.bos_token, tok.eos_token, tok.add_bos_token) == ("D", None, "</s>", False)
    assert {1, 2} <= set(tok.eos_token_ids)
    # an object of names to templates (transformers reads it too); a chat_template.jinja wins over whatever the
    # config holds, even what could not be read as a template
    json.dump({**json.load(open(cfg)), "chat_template": {"default": "O", "tool_use": "T"}}, open(cfg, "w"))
    assert Tokenizer.from_pretrained(str(tmp_path)).chat_template == "O"
    json.dump({**json.load(open(cfg)), "chat_template": [1, "x"]}, open(cfg, "w"))
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_pretrained(str(tmp_path)).chat_template == "J"


def _byte_fallback_tokenizer(directory) -> Tokenizer:
    """A Llama-2 / Mistral-style tokenizer: SentencePiece spaces (▁), characters outside its vocabulary spelled as
    <0xNN> byte tokens, a decoder of Replace, ByteFallback, Fuse and Strip."""
    import json
    import os

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                                        + ["▁", "I", "l", "o", "v", "e", "k"])}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, open(os.path.join(directory, "tokenizer_config.json"), "w"))
    return Tokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("lazy", [False, True])
def test_a_prompt_ending_in_byte_spelled_characters_leaves_the_outputs_whole(tmp_path, lazy):
    """The window's prompt tokens start on a whole character (vLLM's choice of prompt suffix): starting inside
    the prompt's last byte-spelled emoji, the byte-fallback decoder had turned the output's own emoji into U+FFFD
    as well ('���� ok' for '🙂 ok')."""
    tok = _byte_fallback_tokenizer(tmp_path / "sp")
    prompt = tok.encode("I love 🙂🙂", add_special_tokens=True)
    out = tok.encode("🙂 ok", add_special_tokens=False)
    out = out[1:] if out[0] == tok.encode(" ", add_special_tokens=False)[0] else out    # no leading ▁
    want = tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert want == "🙂 ok"
    d = IncrementalDetokenizer(tok, prompt, lazy=lazy)
    streamed = ""
    for i, t in enumerate(out):
        d.add(t)
        last = i == len(out) - 1
        if last:
            d.flush()
        streamed += d.take_delta(last)
    assert streamed == d.text == want


def test_a_stop_string_the_held_text_completes_at_the_end_is_found(tmp_path):
    """The last token of a sequence that ran out of length completes a stop string and starts another character
    (a byte-level BPE token of 中 and two of 文's three bytes): its text is held, so only flush sees it.
    flush(check_stop=True) finds the stop string and cuts there; the held text had been appended unsearched."""
    import json
    import os

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = [("ä", "¸"), ("ä¸", "Ń"), ("æ", "ĸ"), ("ä¸Ń", "æĸ")]
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    os.makedirs(tmp_path / "bl")
    hf.save(str(tmp_path / "bl" / "tokenizer.json"))
    json.dump({}, open(tmp_path / "bl" / "tokenizer_config.json", "w"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "bl"))
    last = vocab["ä¸Ńæĸ"]
    assert tok.decode([last]) == "中\ufffd"
    for check in (True, False):
        d = IncrementalDetokenizer(tok, tok.encode("hi", add_special_tokens=False), stop=["中"])
        for t in tok.encode("ok ", add_special_tokens=False) + [last]:
            assert d.add(t) is None                       # 中 is held with the unfinished 文
        d.flush(check_stop=check)
        assert (d.stopped_by, d.text) == (("中", "ok ") if check else (None, "ok 中\ufffd"))
