"""The codec's one exception type (raised by the Python API and by the C++ extension)."""

from __future__ import annotations


class CodecError(ValueError):
    """A chunk or profile that cannot be coded: corrupt, truncated, hostile or mismatched
    input, or values the chosen level cannot represent."""
