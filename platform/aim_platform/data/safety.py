"""Untrusted Parquet never runs code: plain Arrow columns only.

Ray registers the Arrow extension type ``ray.data.arrow_pickled_object`` in every process that
imports ``ray.data``; the values of a column of that type are pickles, unpickled by
``to_pylist``/``to_numpy``. A crafted shard with such an ``image`` or ``label`` column would run
code in whatever reads it (checked here: a shard whose ``image`` column held a pickle created
a file on disk when a validation task decoded it). The platform's shards hold plain columns
(strings, binary, integers), so any extension type, anywhere in a schema, is refused before
a value is read.
"""

from __future__ import annotations

import pyarrow as pa

from aim_platform.errors import UnsafeFile


def _extension(dtype: pa.DataType) -> str | None:
    """The name of an extension type in ``dtype`` (nested too), or None."""
    if isinstance(dtype, pa.ExtensionType):
        return dtype.extension_name
    if pa.types.is_dictionary(dtype):
        return _extension(dtype.value_type)
    for i in range(dtype.num_fields):
        found = _extension(dtype.field(i).type)
        if found:
            return found
    return None


def require_plain_columns(schema: pa.Schema, path: str) -> None:
    """Refuse a Parquet file whose schema holds an Arrow extension type.

    Raises:
        UnsafeFile: one line naming the file and the column.
    """
    for field in schema:
        name = _extension(field.type)
        if name is not None:
            raise UnsafeFile(
                f"{path}: refused: column {field.name!r} has the Arrow extension type "
                f"{name!r}, whose values are unpickled when read (it could run code); "
                "shards hold plain columns only"
            )
