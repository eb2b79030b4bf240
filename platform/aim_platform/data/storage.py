"""The data modules' name for :mod:`aim_platform.storage` (``storage.filesystem``, ...).

The URL helpers moved below every layer, so that models (the trunk and codebook files) and
evaluation read files without reaching into ``data``. ``data/sources.py`` and
``data/shards.py`` still say ``from aim_platform.data import storage``; everything else
imports :mod:`aim_platform.storage`. Remove this module once those two do too.
"""

from aim_platform.storage import (
    endpoint_url,
    filesystem,
    is_remote,
    join,
    parse_storage_options,
    public_url,
    pyarrow_filesystem,
)

__all__ = [
    "endpoint_url",
    "filesystem",
    "is_remote",
    "join",
    "parse_storage_options",
    "public_url",
    "pyarrow_filesystem",
]
