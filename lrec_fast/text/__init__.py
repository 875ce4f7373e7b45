"""Item text: tokeniser and encoders."""

from .encoder import (
    MINILM_NAME,
    CachedEncoder,
    HashingEncoder,
    MiniLMEncoder,
    TextEncoder,
    encoder_by_name,
    minilm_dir,
)
from .tokenizer import WordPieceTokenizer

__all__ = [
    "MINILM_NAME",
    "CachedEncoder",
    "HashingEncoder",
    "MiniLMEncoder",
    "TextEncoder",
    "WordPieceTokenizer",
    "encoder_by_name",
    "minilm_dir",
]
