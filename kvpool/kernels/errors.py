"""The codec's one exception type (raised by the Python API and by the C++ extension)."""

from __future__ import annotations


class CodecError(ValueError):
    """A chunk or profile that cannot be coded: corrupt, truncated, hostile or mismatched
    input, or values the chosen level cannot represent."""


class ProfileMismatch(CodecError):
    """A chunk coded with a model profile that the decoder was not given: none, or one
    without the slice the chunk names (another model, another build of the profile)."""
