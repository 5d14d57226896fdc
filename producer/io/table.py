"""Column-by-header CSV tables, plain or gzip-compressed, parsed by numpy's C reader.

traccc and ACTS match CSV columns by header name, never by position; so do we. On a parse error the
slow path re-reads the text to name the exact line and column.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.io.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Column:
    """One column a reader wants.

    Attributes:
        name: header name.
        dtype: numpy dtype of the parsed values.
        required: a missing required column is an error; a missing optional one is absent from the result.
        converter: optional text -> value function for columns numpy cannot parse (slow; small files only).
    """

    name: str
    dtype: str
    required: bool = True
    converter: Callable[[str], Any] | None = None


def read_text(path: str | Path) -> str:
    """Whole file as text; ``.gz`` (or gzip magic) is decompressed transparently."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(p, "file not found") from None
    except IsADirectoryError:
        raise InputError(p, "is a directory, expected a CSV file") from None
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(p, f"gzip data is truncated or corrupt ({exc})") from None
    # latin-1 maps every byte, so a raw-byte field (ACTS 48's local_key) survives decoding.
    return raw.decode("latin-1")


def split_header(path: str | Path, text: str) -> tuple[list[str], str, int]:
    """Header names, the body text, and the file line number of the body's first line."""
    if not text.strip():
        raise InputError(path, "file is empty (no header line)")
    nl = text.find("\n")
    head, body = (text, "") if nl < 0 else (text[:nl], text[nl + 1 :])
    names = [h.strip() for h in head.strip().split(",")]
    if any(not n for n in names):
        raise InputError(path, f"malformed header line {head.strip()!r}", line=1)
    if len(set(names)) != len(names):
        raise InputError(path, f"repeated column names in header {names}", line=1)
    return names, body, 2


def read_table(path: str | Path, columns: Sequence[Column], text: str | None = None) -> dict[str, np.ndarray]:
    """Read the wanted columns of a CSV file.

    Returns:
        column name -> 1-D array, for every required column and every optional one present.

    Raises:
        InputError: empty or truncated file, missing columns, values that do not parse.
    """
    if text is None:
        text = read_text(path)
    names, body, first_line = split_header(path, text)
    missing = [c.name for c in columns if c.required and c.name not in names]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; header has {names}")
    wanted = [c for c in columns if c.name in names]
    if not body.strip():
        return {c.name: np.zeros(0, dtype=c.dtype) for c in wanted}
    if not body.endswith("\n"):
        # A last line without newline is how a file cut short mid-write looks; numpy would accept it.
        last = body.rsplit("\n", 1)[-1]
        if last.count(",") != len(names) - 1:
            n_line = first_line + body.count("\n")
            raise InputError(path, f"truncated last line {last[:60]!r}", line=n_line)
    usecols = [names.index(c.name) for c in wanted]
    dtype = np.dtype([(c.name, c.dtype) for c in wanted])
    converters = {i: c.converter for i, c in zip(range(len(wanted)), wanted, strict=True) if c.converter}
    try:
        table = np.loadtxt(
            io.StringIO(body),
            delimiter=",",
            dtype=dtype,
            usecols=usecols,
            ndmin=1,
            comments=None,
            converters=converters or None,
        )
        if body.count(",") != (len(names) - 1) * table.shape[0]:
            _check_widths(path, body, len(names), first_line)
    except (ValueError, TypeError, OverflowError) as exc:
        _locate_error(path, body, names, wanted, first_line)
        raise InputError(path, f"cannot parse ({exc})") from None
    return {c.name: np.ascontiguousarray(table[c.name]) for c in wanted}


def _check_widths(path: str | Path, body: str, n_cols: int, first_line: int) -> None:
    # usecols makes numpy ignore extra or missing trailing fields; a row of the wrong width is corrupt.
    commas = n_cols - 1
    for k, line in enumerate(body.split("\n")):
        if line and line.count(",") != commas and line.strip():
            raise InputError(
                path, f"row has {line.count(',') + 1} fields, header has {n_cols}", line=first_line + k
            )


def _locate_error(
    path: str | Path, body: str, names: list[str], wanted: Sequence[Column], first_line: int
) -> None:
    index = {c.name: names.index(c.name) for c in wanted}
    for k, line in enumerate(body.split("\n")):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != len(names):
            raise InputError(
                path, f"row has {len(fields)} fields, header has {len(names)}", line=first_line + k
            )
        for c in wanted:
            value = fields[index[c.name]].strip()
            try:
                if c.converter is not None:
                    c.converter(value)
                else:
                    kind = np.dtype(c.dtype).kind
                    if kind in "iu":
                        v = int(value)
                        info = np.iinfo(np.dtype(c.dtype))
                        if not info.min <= v <= info.max:
                            raise OverflowError
                    else:
                        float(value)
            except (ValueError, OverflowError):
                raise InputError(
                    path,
                    f"cannot read {value[:40]!r} as {np.dtype(c.dtype).name}",
                    line=first_line + k,
                    column=c.name,
                ) from None
