"""The byte-level tokenizer: UTF-8 bytes are tokens 0..255, plus ``<|endoftext|>`` = 256.

No vocabulary file and no training: any text round-trips, which keeps the tiny presets offline
and the artifact's tokenizer a three-key JSON spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as token ids, with one special end-of-text token after them."""

    type = "byte"
    eos_token = EOS_TOKEN
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``'s UTF-8 bytes (no special tokens added)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids; special ids (>= 256, including unused embedding rows a model
        may sample) are skipped and invalid UTF-8 becomes U+FFFD rather than an error, because
        sampled bytes need not form whole characters."""
        if hasattr(ids, "tolist"):  # a tensor or array: plain ints, not 0-d tensors
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"token id must be >= 0, got {i} (ignore_index -100 left in the ids?)")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description that ``tokenizer_from_spec`` rebuilds this from."""
        return {"type": self.type, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "eos_token": self.eos_token}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def tokenizer_from_spec(spec: dict[str, Any]) -> ByteTokenizer:
    """Rebuild a tokenizer from ``spec()`` output (e.g. an artifact's tokenizer JSON)."""
    kind = spec.get("type")
    if kind != ByteTokenizer.type:
        raise ValueError(f"tokenizer spec: unknown type {kind!r}; valid types: {ByteTokenizer.type!r}")
    tok = ByteTokenizer()
    # A spec that disagrees with the code would silently shift ids: refuse it.
    for key, want in tok.spec().items():
        if key in spec and spec[key] != want:
            raise ValueError(f"tokenizer spec: {key}={spec[key]!r} does not match the byte tokenizer's {want!r}")
    return tok
