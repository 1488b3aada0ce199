"""models.common.digest: the content fingerprint a server reports for its checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.common import digest
from models.common.digest import checkpoint_digest


def _checkpoint(root: Path, weights: bytes) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "sub" / "head.safetensors").write_bytes(b"head")
    return root


def test_digest_follows_content_not_path(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 64
    a = checkpoint_digest(_checkpoint(tmp_path / "a", weights))
    assert a is not None and len(a) == digest.DIGEST_CHARS
    assert checkpoint_digest(_checkpoint(tmp_path / "b", weights)) == a  # a copy elsewhere
    (tmp_path / "b" / ".lock").write_text("x")  # hidden files are not part of it
    assert checkpoint_digest(tmp_path / "b") == a
    changed = bytearray(weights)
    changed[1000] ^= 0x10
    assert checkpoint_digest(_checkpoint(tmp_path / "c", bytes(changed))) != a
    (tmp_path / "b" / "sub" / "head.safetensors").rename(tmp_path / "b" / "sub" / "head2.safetensors")
    assert checkpoint_digest(tmp_path / "b") != a  # names count
    (tmp_path / "b" / "extra.json").write_text("{}")
    assert checkpoint_digest(tmp_path / "b") != checkpoint_digest(tmp_path / "a")
    assert checkpoint_digest(tmp_path / "missing") is None
    assert checkpoint_digest(tmp_path / "a" / "config.json") is None  # not a directory


def test_large_files_are_read_in_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FULL_HASH_BYTES only the start, the end and MIDDLE_WINDOWS evenly spaced windows are read: a change
    inside a window (every retrained tensor) is seen, one between windows is not (the documented trade-off)."""
    monkeypatch.setattr(digest, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(digest, "WINDOW_BYTES", 100)
    monkeypatch.setattr(digest, "MIDDLE_WINDOWS", 2)
    spans = digest._file_windows(1000 + 1)
    assert spans == [(0, 100), (300, 100), (600, 100), (901, 100)]
    assert sum(n for _, n in digest._file_windows(500)) == 500  # small files whole
    base = bytes(1001)
    ref = checkpoint_digest(_checkpoint(tmp_path / "ref", base))
    for i, at in enumerate((50, 350, 650, 1000)):  # in each window
        b = bytearray(base)
        b[at] = 1
        assert checkpoint_digest(_checkpoint(tmp_path / f"in{i}", bytes(b))) != ref
    b = bytearray(base)
    b[200] = 1  # between the first two windows
    assert checkpoint_digest(_checkpoint(tmp_path / "between", bytes(b))) == ref
