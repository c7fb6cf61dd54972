"""Token-aware chunking: windows of the embedding model's own word pieces, with overlap.

Counting the embedder's tokens (not characters or words) keeps every chunk inside what the model
actually reads (all-MiniLM-L6-v2 truncates at 256 word pieces), and cutting at token offsets
keeps each chunk an exact substring of the scrubbed text.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from keel.pipeline.embedding import model_dir


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    seq: int
    start: int
    end: int
    text: str


@functools.lru_cache(maxsize=1)
def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def chunk_text(doc_id: str, text: str, size: int, overlap: int) -> list[Chunk]:
    if not text.strip():
        return []
    offsets = [o for o in _tokenizer().encode(text, add_special_tokens=False).offsets if o[1] > o[0]]
    if not offsets:
        return []
    step = max(1, size - overlap)
    chunks = []
    for seq, first in enumerate(range(0, max(1, len(offsets) - overlap), step)):
        window = offsets[first : first + size]
        start, end = window[0][0], window[-1][1]
        piece = text[start:end]
        cid = hashlib.sha256(f"{doc_id}\0{seq}\0{piece}".encode()).hexdigest()[:32]
        chunks.append(Chunk(cid, seq, start, end, piece))
        if first + size >= len(offsets):
            break
    return chunks
