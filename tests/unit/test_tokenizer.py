"""ByteTokenizer: round trips, special ids, invalid bytes, spec round trip."""

import json

import pytest
import torch

from modelfleet.config import ModelConfig
from modelfleet.data.tokenizer import ByteTokenizer, tokenizer_from_spec


@pytest.mark.parametrize("text", ["hello, world\n", "naïve café — Größe", "日本語テキスト", "emoji 🚀👩‍👩‍👧 ok", ""])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_multibyte_lengths():
    tok = ByteTokenizer()
    assert len(tok.encode("a")) == 1
    assert len(tok.encode("é")) == 2
    assert len(tok.encode("€")) == 3
    assert len(tok.encode("🚀")) == 4


def test_encode_batch():
    tok = ByteTokenizer()
    assert tok.encode_batch(["ab", "", "é"]) == [[97, 98], [], [0xC3, 0xA9]]


def test_decode_skips_special_ids_and_accepts_tensors():
    tok = ByteTokenizer()
    ids = tok.encode("hi") + [tok.eos_id] + tok.encode("!") + [260]
    assert tok.decode(ids) == "hi!"
    assert tok.decode(torch.tensor(ids)) == "hi!"


def test_decode_invalid_utf8_does_not_raise():
    tok = ByteTokenizer()
    # A lone continuation byte and a truncated 4-byte sequence (half an emoji).
    out = tok.decode([0x80, 104, 105] + list("🚀".encode())[:2])
    assert "\ufffd" in out and "hi" in out


def test_decode_negative_id_raises():
    with pytest.raises(ValueError, match="-100"):
        ByteTokenizer().decode([104, -100])


def test_constants_fit_default_model():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.eos_token) == (257, 256, "<|endoftext|>")
    assert ModelConfig().vocab_size >= tok.vocab_size


def test_spec_round_trip_through_json():
    spec = ByteTokenizer().spec()
    assert spec == {"type": "byte", "vocab_size": 257, "eos_id": 256, "eos_token": "<|endoftext|>"}
    tok = tokenizer_from_spec(json.loads(json.dumps(spec)))
    assert isinstance(tok, ByteTokenizer)
    assert tok.spec() == spec


def test_unknown_spec_type_raises():
    with pytest.raises(ValueError, match="unknown type 'bpe'"):
        tokenizer_from_spec({"type": "bpe"})


def test_inconsistent_spec_raises():
    with pytest.raises(ValueError, match="eos_id"):
        tokenizer_from_spec({"type": "byte", "eos_id": 0})
