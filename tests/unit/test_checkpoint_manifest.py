"""The checkpoint manifest: sizes and SHA-256 recorded, and each kind of damage found."""

import hashlib
import os

import pytest

from megatron_ext.checkpoint import manifest as m


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "iter_0000010"
    (d / "rng").mkdir(parents=True)
    files = {"__0_0.distcp": os.urandom(30_000), "common.pt": b"x" * 100, "rng/pp0.pt": b"r"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return str(d), files


def _write(directory, hashed=True):
    names = m.list_files(directory)
    return m.write(directory, m.describe(directory, names, hashed=hashed), hashed=hashed,
                   iteration=10)  # fmt: skip


def test_manifest_records_every_file_with_size_and_sha256(checkpoint):
    directory, files = checkpoint
    _write(directory)
    read = m.read(directory)
    assert sorted(read.files) == sorted(files)  # the manifest does not list itself
    for name, data in files.items():
        assert read.files[name].size == len(data)
        assert read.files[name].sha256 == hashlib.sha256(data).hexdigest()
    assert read.total_bytes == sum(map(len, files.values()))
    assert m.size_problems(directory, read) == []
    assert m.hash_problems(directory, read, read.files) == []


def test_truncated_and_missing_files_are_named_by_size_alone(checkpoint):
    directory, _ = checkpoint
    manifest = _write(directory, hashed=False)
    with open(os.path.join(directory, "__0_0.distcp"), "r+b") as f:
        f.truncate(1000)
    os.remove(os.path.join(directory, "rng", "pp0.pt"))
    problems = m.size_problems(directory, manifest)
    assert any("__0_0.distcp: 1,000 bytes, the manifest says 30,000" in p for p in problems)
    assert any(p.endswith("pp0.pt: missing") for p in problems)


def test_a_flipped_byte_is_found_by_the_hash_only(checkpoint):
    directory, files = checkpoint
    manifest = _write(directory)
    path = os.path.join(directory, "__0_0.distcp")
    data = bytearray(files["__0_0.distcp"])
    data[12345] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert m.size_problems(directory, manifest) == []
    assert m.hash_problems(directory, manifest, manifest.files) == [
        f"{path}: contents differ from the manifest (SHA-256)"
    ]


def test_an_unreadable_manifest_is_damage_not_a_crash(checkpoint):
    directory, _ = checkpoint
    open(os.path.join(directory, m.MANIFEST), "w").write('{"files": {"a": ')
    with pytest.raises(m.DamagedCheckpointError, match="unreadable manifest"):
        m.read(directory)
    os.remove(os.path.join(directory, m.MANIFEST))
    assert m.read(directory) is None  # an older checkpoint: nothing to check against


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_hash_shares_cover_each_file_once(world):
    files = [f"f{i}" for i in range(10)]
    shares = [m.shares(files, r, world) for r in range(world)]
    assert sorted(f for s in shares for f in s) == files


def test_human_bytes():
    assert [m.human_bytes(n) for n in (512, 3.5 * 2**20, 1.25 * 2**30, 3 * 2**40)] == [
        "512 B", "3.5 MiB", "1.2 GiB", "3.00 TiB",
    ]  # fmt: skip
