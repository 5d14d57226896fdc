"""The error every reader raises on bad input: it names the file, the line or column, and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input file.

    Attributes:
        path: the file.
        line: 1-based line number in the file, when the problem is on one line.
        column: the column name, when the problem is in one column.
        problem: what is wrong.
    """

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None, column: str | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem
        where = self.path + (f":{line}" if line is not None else "")
        col = f" column {column!r}:" if column is not None else ""
        super().__init__(f"{where}:{col} {problem}")
