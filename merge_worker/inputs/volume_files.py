"""The one way the worker opens an input: beneath a checked folder, so no byte outside a volume is opened.

A path is followed one component at a time from a directory fd (`openat` with O_NOFOLLOW | O_PATH,
which opens nothing's contents): a symlink is read and its target followed by the same rules, `..`
may not climb above the volume's root, and an absolute link target must lie under the root's real path.
Only when the last component is a regular file is it opened for reading, by name from the fd of the
folder that holds it, with O_NOFOLLOW, and checked to be the very inode the walk found. So a link swapped
in after the check cannot redirect the read (the walk is the check), a FIFO or device is never opened,
and everything afterwards reads through the fd.

This is the userspace form of openat2(RESOLVE_BENEATH): Python's os module has no openat2, and
RESOLVE_BENEATH refuses every absolute symlink, even one that points back inside the volume.

Third-party loaders (transformers, peft) take folder paths. They get a *view*: a private temporary folder
of symlinks to /proc/self/fd/N of files opened here, so they read exactly the checked files.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import weakref
from pathlib import Path

MAX_LINKS = 40  # symlinks followed in one path, as Linux's own limit
MAX_FOLDER_FILES = 4096  # files a view of a folder may hold (each keeps a file descriptor open)
_WALK = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PathRefused(ValueError):
    """A path that leaves its volume, is missing, or is not what it must be. The message is about the
    path only (never about the contents of any file) and reads after the path's name."""


class NotAFile(PathRefused):
    """The path leads to a folder, FIFO, socket or device: never opened for reading."""


class VolumeRoot:
    """A volume's folder, opened once; every input path on that volume is walked from here."""

    def __init__(self, folder: Path):
        _raise_open_file_limit()
        self.path = Path(folder)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)
        self.real = os.path.realpath(self.path)

    def open_folder(self, relative: str, shown: Path) -> InputFolder:
        chain, fd, st, name = _walk(self, [self.fd], relative)
        if not stat.S_ISDIR(st.st_mode):
            _close(chain[1:] + [fd])
            raise PathRefused("is not a folder")
        if name == "." and len(chain) == 1:  # the volume's root itself
            os.close(fd)
            return InputFolder(self, chain, shown)
        return InputFolder(self, chain + [fd], shown)

    def open_file(self, relative: str, shown: Path) -> InputFile:
        chain, fd, st, name = _walk(self, [self.fd], relative)
        try:
            return _open_regular(chain[-1], fd, st, shown, name)
        finally:
            _close(chain[1:] + [fd])


class InputFolder:
    """An input folder (adapter, base model) found beneath its volume; `path` is for messages only."""

    def __init__(self, root: VolumeRoot, chain: list[int], shown: Path):
        self.root = root
        self.path = shown
        self._chain = chain  # O_PATH fds from the root (not owned) down to this folder
        weakref.finalize(self, _close, chain[1:])
        self._view: FolderView | None = None

    @property
    def real(self) -> Path:
        """The folder's real path (for overlap checks against the output)."""
        return _fd_path(self._chain[-1]) or Path(self.root.real)

    def open(self, name: str) -> InputFile:
        """A file of this folder; a symlink may lead elsewhere, but not outside the volume."""
        chain, fd, st, last = _walk(self.root, self._chain, name)
        try:
            return _open_regular(chain[-1], fd, st, self.path / name, last)
        finally:
            _close(chain[1:] + [fd])

    def exists(self, name: str) -> bool:
        """Whether `name` is an entry of the folder (a symlink counts; opening it checks where it leads)."""
        try:
            os.stat(name, dir_fd=self._chain[-1], follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def names(self) -> list[str]:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._chain[-1])
        try:
            return sorted(os.listdir(listing))
        finally:
            os.close(listing)

    def view(self, files: list[InputFile] | None = None) -> FolderView:
        """A folder holding links to `files` (default: every regular file of this folder, a link leading
        outside the volume refused) for loaders that take a path."""
        if files is None:
            if self._view is None:
                self._view = FolderView(self._regular_files())
            return self._view
        return FolderView(files)

    def _regular_files(self) -> list[InputFile]:
        names = self.names()
        if len(names) > MAX_FOLDER_FILES:
            raise PathRefused(f"holds {len(names)} entries; at most {MAX_FOLDER_FILES} are read")
        files = []
        for name in names:
            try:
                files.append(self.open(name))
            except NotAFile:
                continue  # subfolders and other entries are not part of a model folder's files
            except PathRefused as exc:
                raise PathRefused(f"{name} {exc}") from None
        return files


class InputFile:
    """A regular file opened for reading beneath its volume; read it only through these methods."""

    def __init__(self, fd: int, shown: Path, size: int):
        self.fd = fd
        self.path = shown
        self.name = shown.name
        self.size = size
        weakref.finalize(self, os.close, fd)

    def read(self, max_bytes: int) -> bytes:
        if self.size > max_bytes:
            raise PathRefused(f"is {self.size} bytes; at most {max_bytes} are read")
        return self.pread(0, self.size)

    def pread(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.readinto(memoryview(buffer), offset)
        return bytes(buffer)

    def readinto(self, buffer: memoryview, offset: int) -> None:
        """Fills `buffer` from `offset`; a file that shrank meanwhile is an error, not short data."""
        done = 0
        while done < len(buffer):
            got = os.preadv(self.fd, [buffer[done:]], offset + done)
            if got == 0:
                raise PathRefused(f"ended at byte {offset + done} (changed while being read?)")
            done += got

    @property
    def proc_path(self) -> Path:
        """A path that opens this very file again (for libraries that take a path)."""
        return Path(f"/proc/self/fd/{self.fd}")


class FolderView:
    """A private temporary folder of symlinks name -> /proc/self/fd/N of opened input files."""

    def __init__(self, files: list[InputFile]):
        self.files = list(files)
        self.path = Path(tempfile.mkdtemp(prefix="adaptermerge-view-"))
        weakref.finalize(self, shutil.rmtree, self.path, True)
        for file in self.files:
            os.symlink(file.proc_path, self.path / file.name)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def _walk(root: VolumeRoot, start: list[int], relative: str) -> tuple[list[int], int, os.stat_result, str]:
    """Follows `relative` from the folder whose fds (root first) are `start`. Returns the fds of the
    folders down to the last component's folder (the root's first; the others are new, for the caller to
    close), the O_PATH fd of the last component, its stat and its name in that folder. Raises PathRefused."""
    chain = [start[0]] + [os.dup(fd) for fd in start[1:]]
    todo = _components(relative)
    links = 0
    try:
        while True:
            name = todo.pop()
            if name == "..":
                if len(chain) == 1:
                    raise PathRefused("leads outside its volume")
                os.close(chain.pop())
                todo = todo or ["."]
                continue
            if name == ".":  # the folder reached so far is the end of the path
                fd = chain.pop() if len(chain) > 1 else os.dup(chain[0])
                return chain, fd, os.fstat(fd), name
            try:
                fd = os.open(name, _WALK, dir_fd=chain[-1])
            except FileNotFoundError:
                raise PathRefused("does not exist") from None
            except NotADirectoryError:
                raise PathRefused("does not exist (a file is in its path)") from None
            except OSError as exc:  # permission denied, a name too long...
                raise PathRefused(f"cannot be opened ({exc.strerror})") from None
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise PathRefused(f"passes more than {MAX_LINKS} symlinks")
                try:
                    target = os.readlink(name, dir_fd=chain[-1])
                except OSError:
                    raise PathRefused("changed while being opened") from None
                if target.startswith("/"):
                    inside = os.path.relpath(os.path.normpath(target), root.real)
                    if inside == ".." or inside.startswith("../"):
                        raise PathRefused("leads outside its volume (through a symlink)")
                    _close(chain[1:])
                    chain, target = chain[:1], inside
                todo.extend(_components(target))
                continue
            if todo and stat.S_ISDIR(st.st_mode):
                chain.append(fd)
                continue
            if todo:
                os.close(fd)
                raise PathRefused("does not exist (a file is in its path)")
            try:
                _check_still_beneath(root, fd)
            except PathRefused:
                os.close(fd)
                raise
            return chain, fd, st, name
    except BaseException:
        _close(chain[1:])
        raise


def _components(relative: str) -> list[str]:
    """The path's components in reverse (the next one last, for pop())."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    return list(reversed(parts)) or ["."]


def _open_regular(folder_fd: int, fd: int, st: os.stat_result, shown: Path, name: str) -> InputFile:
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile("is not a file")
    try:
        opened = os.open(name, _READ, dir_fd=folder_fd)
    except OSError as exc:
        raise PathRefused(f"cannot be opened ({exc.strerror})") from None
    now = os.fstat(opened)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(opened)
        raise PathRefused("changed while being opened")
    os.set_blocking(opened, True)
    return InputFile(opened, shown, now.st_size)


def _fd_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _check_still_beneath(root: VolumeRoot, fd: int) -> None:
    """A folder moved out of the volume while the walk held it would still be below the walk's fds."""
    real = _fd_path(fd)
    if real is not None and not Path(real).is_relative_to(root.real):
        raise PathRefused("leads outside its volume (moved during the check)")


def _raise_open_file_limit() -> None:
    """Every input file stays open for the run (a large model has hundreds of shards): use the hard
    limit on open files, not the often lower soft one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
