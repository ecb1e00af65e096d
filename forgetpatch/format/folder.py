"""Files of a patch folder: which names may be listed, bounded reads, and replacing a folder in one step.

Example:
    >>> name_problem("../../etc/passwd")
    'outside the patch'
    >>> swap(Path(".p.new"), Path("p"))   # the two folders trade places atomically (Linux)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of a patch folder, or ``None`` when it can.

    A file name is a relative POSIX path inside the folder: not empty, not absolute, no ``.`` or ``..``
    part, no backslash (a separator elsewhere) and no control character.
    """
    if (
        not isinstance(name, str)
        or not name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        return "outside the patch (not a plain relative file name)"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "outside the patch"
    return None


def is_hidden(name: str) -> bool:
    """Whether any part of ``name`` starts with a dot (``.env``, ``.git/config``): never part of a patch."""
    return any(part.startswith(".") for part in name.split("/"))


def inside(target: Path, root: Path) -> bool:
    """Whether ``target``, links followed, lies in ``root``."""
    return target.resolve().is_relative_to(root.resolve())


def read_bounded(file: Path, limit: int, error: Callable[[str], Exception]) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error(message)`` is raised otherwise.

    The size is checked before reading and the read stops at ``limit + 1`` bytes, so neither a huge
    file nor a device (``/dev/zero``) or FIFO behind a link can take unbounded memory or time.
    """
    try:
        info = os.stat(file)
    except OSError as exc:
        raise error(f"cannot read {file}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{file} is not a regular file")
    if info.st_size > limit:
        raise error(f"{file} is {info.st_size:,} bytes, more than the {limit:,} allowed")
    with open(file, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{file} is more than the {limit:,} bytes allowed")
    return data


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` (empty when it does not exist), sorted."""
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)  # links never reach here: carry_over and copytree recreate them
    except OSError:
        if not Path(src).is_file():
            raise
        shutil.copy2(src, dst)


def carry_over(src: Path, dst: Path, skip: set[str]) -> None:
    """Put every entry of ``src`` but ``skip`` into ``dst``: files hard-linked (copied across devices), links as links.

    Raises ``FileExistsError`` for an entry that is neither a file, a folder nor a link (a FIFO, a socket).
    """
    for entry in entries(src):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(entry, target)
        else:
            raise FileExistsError(
                f"{entry} is neither a file, a folder nor a link; move it out of {src} before saving a patch there"
            )


RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def swap(a: Path, b: Path) -> None:
    """Exchange two folders: afterwards ``b`` holds what ``a`` held and ``a`` what ``b`` held.

    On Linux this is one ``renameat2(RENAME_EXCHANGE)``: at every instant, ``b`` is one folder or the
    other, whole. Where that call does not exist (other systems, some filesystems) it takes two renames;
    a kill between them leaves ``b``'s old content whole beside it, as ``.<name>.<tag>.old``.
    """
    exchange = _renameat2()
    if exchange is not None:
        if exchange(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(a), None, str(b))
    aside = b.with_name(f".{b.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


_WRITER_LOCKS: dict[tuple[int, str], FileLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def writer_lock(folder: Path) -> FileLock:
    """The lock that lets one writer at a time replace the patch folder ``folder``, across threads and processes of
    this machine: a ``filelock.FileLock`` on a file named after the folder's absolute path, in a folder of the
    user's in the system's temporary folder (nothing is left beside the patch); one object per folder and process, so
    that a writer holding it may take it again (reentrant in its thread).

    Example:
        >>> with writer_lock(Path("no-circle")):   # read, change and save without losing another writer's change
        ...     ...
    """
    where = os.path.abspath(folder)
    key = (os.getpid(), where)  # a forked child makes its own: filelock refuses an inherited one
    with _WRITER_LOCKS_GUARD:
        lock = _WRITER_LOCKS.get(key)
        if lock is None:
            user = os.getuid() if hasattr(os, "getuid") else os.getlogin()  # another user's folder is not writable
            place = Path(tempfile.gettempdir()) / f"forgetpatch-locks-{user}"
            place.mkdir(mode=0o700, exist_ok=True)
            name = hashlib.sha256(os.fsencode(where)).hexdigest()[:32]
            lock = _WRITER_LOCKS[key] = FileLock(str(place / f"{name}.lock"))
    return lock


def identity(path: Path) -> tuple[int, int, int] | None:
    """What tells ``path`` apart from a file or folder put in its place (a save replaces a patch as a whole):
    device, inode and change time; ``None`` where nothing is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns
