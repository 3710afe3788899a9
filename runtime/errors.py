"""One exception hierarchy for everything a user can get wrong or a file can carry wrong.

CLIs catch :class:`WeightpackError` and print its message as one line; anything else is a bug.
"""

from __future__ import annotations


class WeightpackError(Exception):
    """Base class: a problem with the user's input, never a bug in weightpack."""


class FormatError(WeightpackError):
    """The file is not a valid weightpack file (bad magic, bad index, bad layout)."""


class BadMagic(FormatError):
    """The first bytes are not a weightpack preamble."""


class UnsupportedVersion(FormatError):
    """The file (or one of its schemes or coders) needs a newer weightpack."""


class TruncatedFile(FormatError):
    """The file is shorter than its preamble or index says."""


class ChecksumMismatch(FormatError):
    """A stored checksum does not match the bytes read."""


class CorruptBlob(FormatError):
    """A coded payload does not decode to what the index declares."""


class LimitExceeded(FormatError):
    """A declared count, dimension or size is beyond what weightpack accepts."""


class LayoutError(FormatError):
    """The preamble's offsets, sizes or alignment, or the placement of the blobs, break the
    layout rules (docs/FORMAT.md): trailing bytes, overlaps, gaps, non-zero padding."""


class ArchitectureError(WeightpackError):
    """The weights do not match the architecture, or no architecture can be inferred."""


class CheckpointError(WeightpackError):
    """The input checkpoint cannot be read safely."""


class ConfigError(WeightpackError):
    """A method option or override is invalid."""


class DataError(WeightpackError):
    """An evaluation or calibration data folder is missing, empty or unreadable."""


class OutputError(WeightpackError):
    """The output path cannot be written (missing folder, a directory, no permission)."""


def printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped (``\\x1b``, ``\\n``).

    Names and strings come from files; a message or a terminal must not carry a file's escape
    sequences or line breaks raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
