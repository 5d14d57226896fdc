"""The gateway's system shared memory registry, on files in a temporary directory (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from producer.gateway.model import OUTPUT_BY_NAME, InferError, Status
from producer.gateway.shm import SharedMemoryRegistry, write_outputs


@pytest.fixture
def registry(tmp_path):
    (tmp_path / "data").write_bytes(np.arange(1024, dtype=np.uint8).tobytes())
    reg = SharedMemoryRegistry(tmp_path)
    yield reg
    reg.unregister()


def test_a_region_is_a_view_of_the_file_from_its_offset(registry, tmp_path):
    registry.register("r", "/data", 100, 200)
    assert registry.status() == [{"name": "r", "key": "/data", "offset": 100, "byte_size": 200}]
    part = registry.slice(
        {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 4}, "x"
    )
    assert bytes(part.data) == bytes(range(104, 112))
    part.data[:] = b"\xff" * 8  # outputs are written through to the file
    assert (tmp_path / "data").read_bytes()[104:112] == b"\xff" * 8
    assert registry.slice({"binary_data_size": 8}, "x") is None


@pytest.mark.parametrize(
    ("key", "text"),
    [("../data", "plain name"), ("a/b", "plain name"), ("..", "plain name"), ("/missing", "cannot open")],
)
def test_keys_must_name_files_in_the_directory(registry, key, text):
    with pytest.raises(InferError, match=text):
        registry.register("r", key, 0, 1)


def test_symlinks_and_directories_are_refused(registry, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "dir").mkdir()
    for key in ("link", "dir"):
        with pytest.raises(InferError, match="cannot open"):
            registry.register("r", key, 0, 1)
    assert registry.status() == []


def test_bad_slices_and_names(registry):
    registry.register("r", "data", 0, 16)
    with pytest.raises(InferError, match="already registered"):
        registry.register("r", "data", 0, 16)
    for params, text in (
        ({"shared_memory_region": "q", "shared_memory_byte_size": 4}, "no shared memory region 'q'"),
        ({"shared_memory_region": "r"}, "shared_memory_byte_size must be given"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, "non-negative"),
        (
            {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 9},
            "exceed the 16",
        ),
        ({"shared_memory_region": 3, "shared_memory_byte_size": 8}, "must be a string"),
    ):
        with pytest.raises(InferError, match=text) as err:
            registry.slice(params, "input 'VALUE'")
        assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(InferError) as err:
        registry.unregister("q")
    assert err.value.status is Status.NOT_FOUND


def test_unregistering_a_region_in_use_keeps_its_memory_until_the_request_is_done(registry):
    registry.register("r", "data", 0, 64)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 64}
    tensor = np.frombuffer(registry.slice(params, "x").readonly, np.uint8)
    target = registry.slice(params, "y")  # an output slice, not yet written
    registry.unregister("r")  # while a request still reads one and will write the other
    assert registry.status() == []
    assert int(tensor.sum()) == sum(range(64))  # still mapped, no crash
    target.data[:4] = b"abcd"
    assert bytes(tensor[:4]) == b"abcd"
    assert not tensor.flags.writeable  # inputs never change the client's memory
    registry.register("r", "data", 0, 64)  # the name is free again


def test_outputs_are_written_only_when_all_fit(registry, tmp_path):
    registry.register("r", "data", 0, 128)
    spec_chi2, spec_ndf = OUTPUT_BY_NAME["TRACK_CHI2"], OUTPUT_BY_NAME["TRACK_NDF"]
    chi2, ndf = np.arange(4, dtype="<f8"), np.arange(12, dtype="<i4")
    small = registry.slice({"shared_memory_region": "r", "shared_memory_byte_size": 32}, "x")
    tiny = registry.slice(
        {"shared_memory_region": "r", "shared_memory_byte_size": 40, "shared_memory_offset": 32}, "x"
    )
    before = (tmp_path / "data").read_bytes()
    with pytest.raises(InferError, match=r"output 'TRACK_NDF' needs 48 bytes .* holds only 40"):
        write_outputs([(spec_chi2, chi2), (spec_ndf, ndf)], {"TRACK_CHI2": small, "TRACK_NDF": tiny})
    assert (tmp_path / "data").read_bytes() == before  # nothing written
    write_outputs([(spec_chi2, chi2), (spec_ndf, ndf)], {"TRACK_CHI2": small})
    assert (tmp_path / "data").read_bytes()[:32] == chi2.tobytes()
