"""The ``lstm`` family: text classification with an embedding, an LSTM and a linear head.

Text is tokenized into lower-cased words; the vocabulary is fitted on the training split (words
seen at least ``min_count`` times; the rest become ``<unk>``) and saved with the artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

PAD, UNK = 0, 1


@dataclass(kw_only=True)
class LSTMParams:
    embed: int = 32
    """Word embedding width."""
    hidden: int = 64
    """LSTM hidden size."""
    max_len: int = 32
    """Tokens kept per text (longer texts are cut, shorter ones padded)."""
    min_count: int = 2
    """Training-split occurrences a word needs to get its own id."""
    vocab_size: int = 0
    """Embedding rows (with <pad> and <unk>); 0 takes it from the dataset's vocabulary."""
    num_classes: int = 0
    """Output classes; 0 takes it from the dataset."""


class LSTMClassifier(nn.Module):
    def __init__(self, p: LSTMParams) -> None:
        super().__init__()
        self.embed = nn.Embedding(max(2, p.vocab_size), p.embed, padding_idx=PAD)
        self.lstm = nn.LSTM(p.embed, p.hidden, batch_first=True)
        self.head = nn.Linear(p.hidden, max(1, p.num_classes))

    def forward(self, tokens: Any, length: Any) -> Any:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), length.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])
