import numpy as np
import pytest

from charlm.data.vocab import CharVocab, UnknownCharError


def test_round_trip_non_ascii():
    text = "Grüße, 世界! naïve café — ünïcödé 🙂\n"
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert len(vocab) == len(set(text))
    assert vocab.chars == sorted(set(text))


def test_plain_data_round_trip():
    vocab = CharVocab.from_text("hello, wörld")
    again = CharVocab.from_dict(vocab.to_dict())
    assert again == vocab
    assert again.encode("wörld") == vocab.encode("wörld")


def test_unknown_policies():
    vocab = CharVocab.from_text("abc")
    with pytest.raises(UnknownCharError, match="'xz'"):
        vocab.encode("axbz")
    assert vocab.decode(vocab.encode("axbz", unknown="skip")) == "ab"


def test_id_dtype_follows_vocab_size():
    assert CharVocab.from_text("abc").id_dtype == np.uint8
    big = CharVocab([chr(0x4E00 + i) for i in range(3000)])
    assert big.id_dtype == np.uint16
    text = "".join(big.chars[::7])
    assert big.decode(big.encode_array(text)) == text
