"""The CSV layer: columns by header name, gzip, and a clear error for every kind of bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from producer.io.cells import read_cells, read_cells_multi
from producer.io.errors import InputError
from producer.io.measurements import read_measurements
from producer.io.table import Column, read_table

HEADER = "geometry_id,measurement_id,channel0,channel1,timestamp,value\n"


def write(path, text, gz=False):
    if gz:
        path.write_bytes(gzip.compress(text.encode("latin-1")))
    else:
        path.write_text(text, encoding="latin-1")
    return path


def test_columns_matched_by_name_not_position(tmp_path):
    f = write(tmp_path / "t.csv", "b,a\n2,1\n4,3\n")
    t = read_table(f, [Column("a", "i8"), Column("b", "i8")])
    assert t["a"].tolist() == [1, 3] and t["b"].tolist() == [2, 4]


def test_gzip_is_transparent(tmp_path):
    text = HEADER + "1152921779484753920,1,3,4,0,0.5\n"
    plain = read_cells(write(tmp_path / "event000000001-cells.csv", text))
    zipped = read_cells(write(tmp_path / "event000000001-cells.csv.gz", text, gz=True))
    assert plain.channel0.tolist() == zipped.channel0.tolist() == [3]


def test_cells_sorted_and_duplicates_summed(tmp_path):
    text = HEADER + "".join(
        f"{g},{m},{c0},{c1},{t},{v}\n"
        for g, m, c0, c1, t, v in [
            (20, 1, 5, 1, 2.0, 0.25),
            (10, 2, 2, 3, 1.0, 0.5),
            (10, 2, 1, 3, 1.0, 0.5),
            (10, 3, 9, 0, 1.0, 0.5),
            (20, 1, 5, 1, 1.0, 0.5),  # duplicate of the first row
        ]
    )
    cells = read_cells(write(tmp_path / "c.csv", text))
    assert cells.geometry_id.tolist() == [10, 10, 10, 20]
    assert list(zip(cells.channel1.tolist(), cells.channel0.tolist(), strict=True)) == [
        (0, 9),
        (3, 1),
        (3, 2),
        (1, 5),
    ]
    assert cells.activation[-1] == pytest.approx(0.75)
    assert cells.time[-1] == pytest.approx(1.0)  # earliest time of the merged pair
    assert cells.measurement_id.tolist() == [3, 2, 2, 1]


def test_multi_event_file(tmp_path):
    text = "event_id," + HEADER + "7,10,1,0,0,0,1\n3,10,1,0,0,0,1\n7,10,1,1,0,0,1\n"
    events = read_cells_multi(write(tmp_path / "all.csv", text))
    assert [e.event_id for e in events] == [3, 7]
    assert [e.size for e in events] == [1, 2]


@pytest.mark.parametrize(
    ("body", "line", "column", "fragment"),
    [
        ("10,1,2,3,0,abc\n", 2, "value", "cannot read 'abc'"),
        ("10,1,-2,3,0,1\n", 2, "channel0", "negative channel"),
        ("10,1,2,3,0,1\n10,1,2\n", 3, None, "fields"),
        ("10,1,2,3,0,1\n10,1,2,3,0,1,9\n", 3, None, "fields"),
        ("10,1,2,3,0,nan\n", 2, "value", "not finite"),
        ("10,1,2,99999999999,0,1\n", 2, "channel1", "out of range"),
    ],
)
def test_bad_cells_name_line_and_column(tmp_path, body, line, column, fragment):
    f = write(tmp_path / "bad.csv", HEADER + body)
    with pytest.raises(InputError) as err:
        read_cells(f)
    assert err.value.line == line
    assert err.value.column == column
    assert fragment in str(err.value)
    assert str(f) in str(err.value)


def test_missing_column_is_named(tmp_path):
    f = write(tmp_path / "bad.csv", "geometry_id,channel0,value\n1,2,3\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['channel1'\]"):
        read_cells(f)


def test_empty_file(tmp_path):
    with pytest.raises(InputError, match="empty"):
        read_cells(write(tmp_path / "e.csv", ""))


def test_header_only_file_is_an_empty_event(tmp_path):
    assert read_cells(write(tmp_path / "h.csv", HEADER)).size == 0


def test_truncated_last_line(tmp_path):
    f = write(tmp_path / "t.csv", HEADER + "10,1,2,3,0,1\n10,1,2,")
    with pytest.raises(InputError, match="truncated") as err:
        read_cells(f)
    assert err.value.line == 3


def test_truncated_gzip(tmp_path):
    blob = gzip.compress((HEADER + "10,1,2,3,0,1\n" * 1000).encode())
    f = tmp_path / "t.csv.gz"
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="gzip data is truncated"):
        read_cells(f)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_cells(tmp_path / "nope.csv")


def test_local_key_as_raw_byte_or_digits(tmp_path):
    head = "measurement_id,geometry_id,local_key,local0,local1,phi,theta,time,var_local0,var_local1,var_phi,var_theta,var_time\n"
    rows = "0,10,\x06,1.5,2.5,0,0,0,0.1,0.2,0,0,0\n1,10,2,1.5,0,0,0,0,0.1,0,0,0,0\n"
    m = read_measurements(write(tmp_path / "m.csv", head + rows))
    assert m.local_key.tolist() == [6, 2]
    assert m.dimension.tolist() == [2, 1]
    np.testing.assert_allclose(m.local0, [1.5, 1.5])
