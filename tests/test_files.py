"""sam3_nn.files: a write leaves the old file or the new one, never a part, nor anything beside it."""

import os
import subprocess
import sys

import pytest

from sam3_nn import files


def test_atomic_write_replaces_or_leaves_nothing(tmp_path, monkeypatch):
    for unnamed in (True, False):  # O_TMPFILE, and the named partial file where there is none
        if not unnamed:
            monkeypatch.setattr(files, "_unnamed", lambda folder: None)
        d = tmp_path / f"unnamed-{unnamed}"
        files.write_text(str(d / "a.txt"), "old")
        with pytest.raises(RuntimeError):
            def fail(f):
                f.write(b"half")
                raise RuntimeError("disk on fire")
            files.atomic_write(str(d / "a.txt"), fail)
        assert os.listdir(d) == ["a.txt"] and (d / "a.txt").read_text() == "old"
        files.atomic_write(str(d / "a.txt"), lambda f: f.write(b"new"))
        assert os.listdir(d) == ["a.txt"] and (d / "a.txt").read_text() == "new"
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(d / "a.txt").st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(IsADirectoryError):
        files.write_text(str(tmp_path), "x")


def test_partial_files_of_dead_processes_are_removed(tmp_path):
    """A process killed while writing with a named partial file leaves it; the next write
    into that folder removes it (and no partial file of a live process)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.bin.sam3-partial-{dead.pid}"
    live = tmp_path / f".y.bin.sam3-partial-{os.getppid()}"
    other = tmp_path / ".z.bin.partial-1"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    files._cleaned.discard(str(tmp_path))
    files.write_text(str(tmp_path / "out.txt"), "done")
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "out.txt"])


def test_output_path_checks(tmp_path):
    from sam3_nn.errors import InputError

    (tmp_path / "f").write_text("x")
    files.check_output_folder(str(tmp_path / "new" / "deeper"))
    files.check_output_file(str(tmp_path / "new" / "w.safetensors"))
    for call, msg in [(lambda: files.check_output_folder(str(tmp_path / "f")), "is a file"),
                      (lambda: files.check_output_folder(str(tmp_path / "f" / "sub")), "is a file"),
                      (lambda: files.check_output_file(str(tmp_path)), "is a folder"),
                      (lambda: files.check_not_inputs([str(tmp_path / "." / "f")], [str(tmp_path / "f")]),
                       "would overwrite")]:
        with pytest.raises(InputError, match=msg):
            call()
