"""Reading and writing files so that nothing is lost and nothing hangs.

- Reads take regular files only (a FIFO would block, /dev/zero would never end) and at
  most `max_bytes`, checked before anything is read.
- Writes go to a temporary file in the target's folder, are flushed to disk and then
  renamed over the target: a reader sees the old file or the new one, never half of one,
  and a write that fails (disk full, a file-size limit) leaves the old file as it was.
- Appends (the JSONL event log) add whole lines only: a short write is cut back off.
- An output that is one of the command's inputs (the same file, by device and inode) is
  refused before anything is read or written.
Every refusal is one GemInputError naming the file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import GemInputError

MAX_FILE_BYTES = 1 << 30  # no file of ours is near 1 GiB: a larger one is not ours


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, must_exist: bool = True) -> os.stat_result | None:
    """The file's stat, or one GemInputError where it is not a regular file (None where it
    does not exist and need not)."""
    try:
        st = os.stat(path)  # stat never blocks, even on a FIFO
    except FileNotFoundError:
        if must_exist:
            raise GemInputError(str(path), "file", "does not exist", "a readable file") from None
        return None
    except OSError as e:  # a symlink loop, a name too long, no permission on a folder
        raise GemInputError(str(path), "file", f"cannot be opened ({e.strerror})", "a readable file") from None
    if not stat.S_ISREG(st.st_mode):
        raise GemInputError(str(path), "file", f"is {_kind(st.st_mode)}", "a regular file")
    return st


def read_bytes(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole of a regular file of at most max_bytes."""
    st = check_regular(path)
    if st.st_size > max_bytes:
        raise GemInputError(str(path), "file", f"is {st.st_size} bytes",
                            f"at most {max_bytes} bytes (the limit on files vllm-gem reads)")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise GemInputError(str(path), "file", f"cannot be read ({e.strerror})", "a readable file") from None
    if len(data) > max_bytes:  # it grew while being read
        raise GemInputError(str(path), "file", f"is over {max_bytes} bytes",
                            f"at most {max_bytes} bytes (the limit on files vllm-gem reads)")
    return data


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` by `data` all at once (temporary file, fsync, rename). A new file gets the
    permissions a plain open() would (0666 less the umask), a replaced one keeps its own."""
    path = Path(path)
    check_regular(path, must_exist=False)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as e:
        raise GemInputError(str(path), "file", f"cannot be written ({e.strerror}); any earlier file "
                            "there is unchanged", "a writable file path (not a folder)") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new file next to `path`, opened for writing: (descriptor, name). Made with os.open and
    0666 so the umask applies (tempfile.mkstemp makes every file 0600: unreadable to a server
    running as another user), then given the replaced file's mode where there is one."""
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(fd, stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            pass
        except OSError:
            os.close(fd)
            os.unlink(name)
            raise
        return fd, name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def append_line(path: str | Path, line: bytes) -> Path:
    """Append one line (a newline is added) as a whole, or not at all."""
    path = Path(path)
    check_regular(path, must_exist=False)
    data = line.rstrip(b"\n") + b"\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise GemInputError(str(path), "file", f"cannot be appended to ({e.strerror})",
                            "a writable file path") from None
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError as e:
            written, err = -1, e
        if written != len(data):
            os.ftruncate(fd, start)  # a short write leaves no half line behind
            why = err.strerror if written < 0 else f"only {written} of {len(data)} bytes fit"
            raise GemInputError(str(path), "file", f"cannot be appended to ({why}); it is unchanged",
                                "a writable file with room for the line")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def refuse_same_file(output: str | Path, output_option: str,
                     inputs: Iterable[tuple[str, str | Path]]) -> None:
    """One GemInputError where `output` is the same file as an input (option, path)."""
    try:
        out = os.stat(output)
    except OSError:
        return  # a new file cannot be an input
    for option, path in inputs:
        try:
            same = os.path.samestat(out, os.stat(path))
        except OSError:
            continue
        if same:
            raise GemInputError(str(output), output_option, f"is the same file as {option} {path}",
                                f"an output path other than {option} (writing it would destroy the input)")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders: the rename is done all the same
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
