"""Tokenizers for the text encoder: a dependency-free byte tokenizer and a SentencePiece one.

Both share one interface so the pipeline never cares which is in use:

* ``encode(texts, max_length) -> (ids int32 [B, L], mask bool [B, L])`` appends EOS to every
  text and pads to ``max_length``. Over-long texts are cut so that EOS is still the last valid
  token: T5 encoders were trained with EOS closing every input.
* ``decode(ids)`` reverses ``encode`` (text up to the first EOS, pads dropped).
* ``vocab_size``, ``pad_id``, ``eos_id``.

``ByteTokenizer`` follows the ByT5 convention (pad 0, eos 1, unk 2, byte ``b`` -> ``b + 3``), so
tests and tiny configs need no model file. ``SentencePieceTokenizer`` loads a local ``.model``
file, e.g. the umT5 tokenizer used with Wan 2.1's text encoder.
"""

from __future__ import annotations

import abc
import os
from typing import Sequence

import numpy as np


class _TokenizerBase(abc.ABC):
    """Shared batching, EOS and padding logic; subclasses only map one text to ids."""

    pad_id: int
    eos_id: int
    vocab_size: int

    @abc.abstractmethod
    def _text_to_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without EOS or padding."""

    @abc.abstractmethod
    def _ids_to_text(self, ids: list[int]) -> str:
        """Text of ids that hold no EOS or padding."""

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``int32 [B, max_length]`` and validity mask ``bool [B, max_length]``."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, got a single str; wrap it: [text]")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1 to hold the EOS token, got {max_length}")
        max_length = int(max_length)
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=bool)
        for row, tokens in enumerate(self._text_to_ids(texts)):
            tokens = list(tokens[:max_length - 1]) + [self.eos_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = True
        return ids, mask

    def decode(self, ids) -> str | list[str]:
        """Text of one id sequence (1-D) or a list of texts (2-D), cut at the first EOS."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            return self._decode_row(arr)
        if arr.ndim == 2:
            return [self._decode_row(r) for r in arr]
        raise ValueError(f"decode expects ids of rank 1 or 2, got shape {arr.shape}")

    def _decode_row(self, row: np.ndarray) -> str:
        if not np.issubdtype(row.dtype, np.integer):
            raise TypeError(f"decode expects integer ids, got dtype {row.dtype}")
        tokens = [int(t) for t in row]
        bad = [t for t in tokens if t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} lie outside the vocabulary [0, {self.vocab_size})")
        if self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        tokens = [t for t in tokens if t != self.pad_id]
        return self._ids_to_text(tokens)


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes as tokens (ByT5 layout): any language, no model file."""

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3
    vocab_size = 256 + 3

    def _text_to_ids(self, texts: list[str]) -> list[list[int]]:
        return [[b + self.offset for b in t.encode("utf-8")] for t in texts]

    def _ids_to_text(self, ids: list[int]) -> str:
        data = bytes(t - self.offset for t in ids if t >= self.offset)
        # Truncation may split a multi-byte character; drop the partial tail, as ByT5 does.
        return data.decode("utf-8", errors="ignore")


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece ``.model`` file (e.g. umT5's); special ids come from the model.

    A model without a pad piece pads with EOS: positions after the first EOS are ignored both by
    the mask and by ``decode``, so the filler id does not matter.
    """

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model file not found: {path!r}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"could not load SentencePiece model {path!r} "
                             f"(corrupt or not a .model file): {e}") from e
        self.model_file = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} defines no EOS piece; "
                             "T5 encoders need one")
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.unk_id = int(self._sp.unk_id())

    def _text_to_ids(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def _ids_to_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def make_tokenizer(spm_path: str | os.PathLike | None) -> ByteTokenizer | SentencePieceTokenizer:
    """SentencePiece when a model file is given, else the byte tokenizer."""
    if spm_path is None or os.fspath(spm_path) == "":
        return ByteTokenizer()
    return SentencePieceTokenizer(spm_path)
