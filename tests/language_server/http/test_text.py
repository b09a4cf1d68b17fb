import random

from language_server.http.text import Detokenizer


def test_incremental_text_equals_one_decode(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    words = tok("Hello there, world! Ünïcödé text, numbers 12345 and émojis 🙂 too.")["input_ids"]
    for trial in range(50):
        ids = [rng.choice(words) if rng.random() < 0.7 else rng.randrange(256) for _ in range(40)]
        detok = Detokenizer(tok)
        pieces = [detok.push(t) for t in ids] + [detok.flush()]
        whole = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == whole == detok.text, trial


def test_partial_utf8_is_held_until_complete(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("é")["input_ids"]  # two byte-level tokens for one character
    assert len(ids) == 2
    detok = Detokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.push(ids[1]) == "é"
