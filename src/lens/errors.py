"""The exceptions LENS raises for input a user got wrong.

Every one is a ``ValueError`` (so ``except ValueError`` keeps working) and carries a message that names the
offending thing — the file, the field, the limit — so the CLI can print it as one line and a service can
return it as a 4xx body without a traceback.
"""

from __future__ import annotations


class InvalidInput(ValueError):
    """An image, query or other argument handed to LENS that it cannot use as given."""


class InvalidConfig(InvalidInput):
    """A config file or value that does not parse, or a field of the wrong type or out of range."""


class InvalidCheckpoint(InvalidInput):
    """A checkpoint, cache shard or record file that is missing parts, truncated or fails its checksum."""


class ImageNotFound(InvalidInput, FileNotFoundError):
    """An image path that does not exist (also a ``FileNotFoundError``)."""
