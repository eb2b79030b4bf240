"""The platform's expected failures: each one is a :class:`PlatformError` whose message says
what is wrong and what to do. The command line prints it on one line and exits with code 2;
any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class PlatformError(Exception):
    """An expected failure (bad input, unreachable service, missing credential)."""


class MissingInput(PlatformError, FileNotFoundError):
    """A file or folder the user named does not exist (a trunk, a dataset, a config)."""


class DataError(PlatformError, ValueError):
    """Data that cannot be used as asked: a source that does not exist or holds no images, a
    bad label map, an empty split, bad storage options."""


class StorageError(PlatformError, OSError):
    """Object storage failed past every retry (a checkpoint whose upload never completed)."""


class UnsafeFile(PlatformError, ValueError):
    """A file refused before anything in it is used: one whose loading could run code (a
    pickle of objects beyond tensors and plain containers), or one that is not what it should
    be (a malformed checkpoint, config or codebook). The message names the file."""
