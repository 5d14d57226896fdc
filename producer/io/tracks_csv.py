"""Writer and reader for trackfleet's track output, one pair of files per event.

``event<N>-tracks.csv``: track_id, d0 [mm], z0 [mm], phi [rad], theta [rad], qop [e/GeV], chi2, ndf,
n_measurements, n_holes, and the 15 upper-triangle covariance entries ``cov_<a>_<b>`` (units of
the parameters' products).

``event<N>-track-measurements.csv``: track_id, geometry_id, local0 [mm], local1 [mm], dimension,
measurement_id (the truth id carried by the input cells; -1 when unknown), inside out along the track.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels.edm.tracks import PARAM_NAMES, Tracks
from producer.io.events import event_file_name
from producer.io.table import Column, read_table

COV_INDEX = [(i, j) for i in range(5) for j in range(i, 5)]
COV_NAMES = [f"cov_{PARAM_NAMES[i]}_{PARAM_NAMES[j]}" for i, j in COV_INDEX]
TRACK_HEADER = ["track_id", *PARAM_NAMES, "chi2", "ndf", "n_measurements", "n_holes", *COV_NAMES]
MEAS_HEADER = ["track_id", "geometry_id", "local0", "local1", "dimension", "measurement_id"]


def tracks_paths(out_dir: str | Path, event_id: int) -> tuple[Path, Path]:
    d = Path(out_dir)
    return d / event_file_name(event_id, "tracks"), d / event_file_name(event_id, "track-measurements")


def write_tracks(out_dir: str | Path, tracks: Tracks) -> tuple[Path, Path]:
    """Write one event's tracks; returns the two paths."""
    t = tracks.to_numpy()
    tpath, mpath = tracks_paths(out_dir, t.event_id)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    n = t.size
    ids = np.arange(n)
    cov = np.stack([t.cov[:, i, j] for i, j in COV_INDEX], axis=1) if n else np.zeros((0, 15))
    with tpath.open("w") as f:
        f.write(",".join(TRACK_HEADER) + "\n")
        for k in range(n):
            p = t.params[k]
            f.write(
                f"{k},{p[0]:.9g},{p[1]:.9g},{p[2]:.9g},{p[3]:.9g},{p[4]:.9g},{t.chi2[k]:.6g},{int(t.ndf[k])},"
                f"{int(t.meas_offsets[k + 1] - t.meas_offsets[k])},{int(t.n_holes[k])},"
                + ",".join(f"{c:.9g}" for c in cov[k])
                + "\n"
            )
    owner = np.repeat(ids, np.diff(t.meas_offsets))
    with mpath.open("w") as f:
        f.write(",".join(MEAS_HEADER) + "\n")
        for k in range(owner.size):
            f.write(
                f"{owner[k]},{int(t.meas_geometry_id[k])},{t.meas_local0[k]:.9g},{t.meas_local1[k]:.9g},"
                f"{int(t.meas_dimension[k])},{int(t.meas_truth_id[k])}\n"
            )
    return tpath, mpath


TRACK_COLUMNS = (
    Column("track_id", "i8"),
    *(Column(p, "f8") for p in PARAM_NAMES),
    Column("chi2", "f8"),
    Column("ndf", "i8"),
    Column("n_measurements", "i8"),
    Column("n_holes", "i8"),
    *(Column(c, "f8") for c in COV_NAMES),
)
MEAS_COLUMNS = (
    Column("track_id", "i8"),
    Column("geometry_id", "u8"),
    Column("local0", "f8"),
    Column("local1", "f8"),
    Column("dimension", "i8", required=False),
    Column("measurement_id", "i8"),
)


def read_tracks(out_dir: str | Path, event_id: int) -> Tracks:
    """Read back what :func:`write_tracks` wrote (also accepts .csv.gz)."""
    tpath, mpath = tracks_paths(out_dir, event_id)
    if not tpath.exists() and tpath.with_suffix(".csv.gz").exists():
        tpath, mpath = tpath.with_suffix(".csv.gz"), mpath.with_suffix(".csv.gz")
    t = read_table(tpath, TRACK_COLUMNS)
    m = read_table(mpath, MEAS_COLUMNS)
    n = t["track_id"].shape[0]
    order = np.argsort(t["track_id"], kind="stable")
    cov = np.zeros((n, 5, 5))
    for (i, j), name in zip(COV_INDEX, COV_NAMES, strict=True):
        cov[:, i, j] = cov[:, j, i] = t[name][order]
    # measurement rows grouped by track id, order along the track kept
    morder = np.argsort(m["track_id"], kind="stable")
    counts = np.bincount(m["track_id"][morder], minlength=n)[:n] if n else np.zeros(0, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Tracks(
        params=np.stack([t[p][order] for p in PARAM_NAMES], axis=1) if n else np.zeros((0, 5)),
        cov=cov,
        chi2=t["chi2"][order],
        ndf=t["ndf"][order].astype(np.int32),
        n_holes=t["n_holes"][order].astype(np.int32),
        meas_offsets=offsets,
        meas_geometry_id=m["geometry_id"][morder],
        meas_local0=m["local0"][morder],
        meas_local1=m["local1"][morder],
        meas_dimension=m.get("dimension", np.full(morder.size, 2))[morder].astype(np.int8),
        meas_truth_id=m["measurement_id"][morder],
        event_id=event_id,
    )
