"""Writing files so that nothing half-written is ever left: at the destination, or beside it.

Every file the package writes (converted weights, libraries, manifests, segmentation
outputs) goes through :func:`atomic_write` or :func:`atomic_write_path`:

* The data goes to a file that is not the destination; the destination is replaced by a
  rename once the data is complete and flushed to disk, so a reader sees the old file or
  the new one, never a part.
* On Linux the file being written has no name at all (``O_TMPFILE``): if the process is
  killed, even by SIGKILL, the kernel frees it. Where that is not available, and for
  :func:`atomic_write_path` (whose writer is another program that needs a path), it is a
  hidden ``.NAME.sam3-partial-PID`` beside the destination: removed when the write fails
  or is interrupted by an exception (the command line turns SIGTERM into one), and, when
  the process was killed, by the next write into that folder (a partial file whose
  process is gone is stale).
* Files are created with the usual mode (``0666`` less the umask, ``0644`` typically),
  as libraries are, not ``0600`` as ``tempfile`` makes them.

Here rather than in ``sam3_nn.runtime``: the weights converter and the compiler write
files too, and the runtime imports them. The ``check_*`` functions find a bad output path
before any work is done (``InputError``). Imports nothing from the package but its errors.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from typing import BinaryIO, Callable, Iterable, Set

from sam3_nn.errors import InputError

PARTIAL = re.compile(r"^\..+\.sam3-partial-(\d+)$")
_cleaned: Set[str] = set()  # folders already rid of stale partial files by this process


def partial_name(path: str) -> str:
    """The hidden name a write to ``path`` uses while it is incomplete (where it needs one)."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.sam3-partial-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(folder: str) -> list:
    """Remove the partial files in ``folder`` left by processes that no longer run; -> their
    paths. A folder is scanned once per process (a batch writes many files into one)."""
    folder = os.path.abspath(folder)
    if folder in _cleaned:
        return []
    _cleaned.add(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = PARTIAL.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def _prepare(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
    remove_stale_partials(folder)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_path(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the whole file at the path ``tmp`` (a hidden partial file beside
    ``path``), which then replaces ``path``. For writers that need a path (a linker)."""
    _prepare(path)
    tmp = partial_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # the writer (a linker) may have made it anew
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _unnamed(folder: str):
    """An ``O_TMPFILE`` descriptor in ``folder``, or None where the system has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # this filesystem or kernel cannot
        raise


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` writes the whole file to the binary file object ``f``, which then replaces
    ``path`` (see the module docstring)."""
    folder = _prepare(path)
    fd = _unnamed(folder)
    if fd is None:
        def by_path(tmp: str) -> None:
            with open(tmp, "wb") as f:
                write(f)
        atomic_write_path(path, by_path)
        return
    tmp = partial_name(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
        os.fsync(fd)
        # give the finished file a (hidden) name, then move it over the destination
        if os.path.lexists(tmp):
            os.unlink(tmp)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:  # a dir_fd makes Python call linkat (which follows the /proc link), not link
            os.link(f"/proc/self/fd/{fd}", os.path.basename(tmp), dst_dir_fd=dir_fd,
                    follow_symlinks=True)
        finally:
            os.close(dir_fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex), read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str, text: str) -> None:
    """``text`` (UTF-8) as the file ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------
# output paths, checked before the work
# ----------------------------------------------------------------------------
def _first_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_folder(path: str, what: str = "output folder") -> None:
    """``path`` is a folder that exists and can be written, or can be created."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InputError(f"{what} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{what} {path} cannot be written (permissions)")
        return
    base = _first_existing(path)
    if not os.path.isdir(base):
        raise InputError(f"{what} {path} cannot be created: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be created in {base} (permissions)")


def check_output_file(path: str, what: str = "output") -> None:
    """``path`` can be written as a file: not a folder, and its folder exists or can be created."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; expected a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path} cannot be overwritten (permissions)")
    check_output_folder(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_inputs(outputs: Iterable[str], inputs: Iterable[str]) -> None:
    """No output would overwrite an input (the image being segmented, the weights...)."""
    inputs = [p for p in inputs if p]
    for out in outputs:
        for inp in inputs:
            if _same(out, inp):
                raise InputError(f"output {out} would overwrite the input {inp}; choose another "
                                 "output folder or name")
