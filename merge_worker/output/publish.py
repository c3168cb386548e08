"""Builds the output in a temporary folder beside its target and publishes it atomically and durably;
cleans what killed runs left behind.

For an output `<parent>/<name>` a run holds the lock file `<parent>/.<name>.adaptermerge-lock` (flock)
from before it creates anything until it has finished or cleaned up. The lock file records which
temporary folders the run has (or may have) created, `.<name>.tmp-<8 hex>` and `.<name>.old-<8 hex>`.
A run killed by SIGKILL or the OOM killer leaves the lock file with that record, and the kernel drops
its lock; the next run for the same output takes the lock, removes exactly the recorded folders (only
real folders of that name pattern, directly beside the output, never one holding an input) and goes on.
A lock held by a live run means another run is writing the output now: a conflict (nothing is touched),
except that a run of the same owner (the previous generation, being stopped) is waited for.

Publishing: every file and folder of the temporary folder is fsynced, the folder is renamed into place
(an existing output is swapped with it atomically, renameat2 RENAME_EXCHANGE, then deleted), and the
parent folder is fsynced, so after a crash the output is either the old one or the complete new one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from merge_worker.output import termination
from merge_worker.output.overlap import ProtectedPath, check_spares_inputs
from merge_worker.output.ownership import OutputConflict, Owner
from merge_worker.progress import log
from merge_worker.spec import SpecError

LOCK_SUFFIX = ".adaptermerge-lock"
_TOKEN_HEX = 8
_MAX_LOCK_BYTES = 1 << 16
# A deleted pod gets SIGTERM, then SIGKILL after its grace period (30 s by default): a new generation of
# the same resource waits this long for the previous one to let go of the output.
SAME_OWNER_WAIT_SECONDS = 120.0
_UNKNOWN_HOLDER_WAIT_SECONDS = 5.0
_LOCK_POLL_SECONDS = 0.2


def _describe(holder: dict) -> str:
    try:
        owner = holder.get("owner")
        who = f"owner {owner['namespace']}/{owner['name']} (uid {owner['uid']}), " if owner else ""
        return f"{who}pid {holder['pid']} on {holder['host']}, since {holder['startedAt']}"
    except (KeyError, TypeError):
        return "its lock file is being written"


def _sibling(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{secrets.token_hex(_TOKEN_HEX // 2)}"


def _leftover_pattern(output: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(output.name)}\.(tmp|old)-[0-9a-f]{{{_TOKEN_HEX}}}$")


class OutputSlot:
    """One run's hold on an output path: the lock, the temporary folder, publishing, cleanup.

    open() -> build into .tmp -> publish() -> close(); on any failure abort()."""

    def __init__(self, output: Path, owner: Owner | None, protected: list[ProtectedPath], field: str):
        self.output = output
        self.tmp = _sibling(output, "tmp")
        self._owner = owner
        self._protected = protected
        self._field = field
        self._lock_path = output.parent / f".{output.name}{LOCK_SUFFIX}"
        self._fd: int | None = None
        self._pending: list[str] = []
        self.replaced = False

    # -- the lock ----------------------------------------------------------------------------------
    def open(self) -> None:
        """Takes the output's lock, removes what killed predecessors left, creates the temp folder."""
        self._fd = self._take_lock()
        try:
            self._remove_leftovers(self._read_record())
            self._pending = [self.tmp.name]
            self._write_record()  # recorded before it exists: a kill right after mkdir leaves it findable
            self.tmp.mkdir()
        except BaseException:
            self._release(keep_record=True)  # a lock file not ours, or leftovers not yet removed
            raise

    def _take_lock(self) -> int:
        started = time.monotonic()
        waiting_logged = False
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SpecError(self._field, f"cannot create the lock file {self._lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                if time.monotonic() - started >= self._patience(holder):
                    raise OutputConflict(self._field, f"another run is writing {self.output} now "
                                                      f"({_describe(holder)}); not touched") from None
                if not waiting_logged and holder:
                    log(f"waiting for the previous run of this resource to end ({_describe(holder)})")
                    waiting_logged = True
                time.sleep(_LOCK_POLL_SECONDS)
                continue
            # The previous holder may have removed the file between our open and our lock: retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._lock_path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _patience(self, holder: dict) -> float:
        """How long to wait for a live holder: a run of the same resource (its previous generation,
        being stopped) for as long as Kubernetes takes to kill it; a holder whose record is not written
        yet, briefly; anyone else not at all."""
        owner = holder.get("owner") or {}
        if self._owner is not None and owner.get("uid") == self._owner.uid:
            return SAME_OWNER_WAIT_SECONDS
        return 0 if holder else _UNKNOWN_HOLDER_WAIT_SECONDS

    @staticmethod
    def _holder(fd: int) -> dict:
        """The live holder's record; {} while it is still being written."""
        try:
            record = json.loads(os.pread(fd, _MAX_LOCK_BYTES, 0))
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _read_record(self) -> dict:
        """A dead predecessor's record (empty for a new lock file); anything else is not ours: refused."""
        data = os.pread(self._fd, _MAX_LOCK_BYTES, 0)
        if not data.strip():
            return {}
        try:
            record = json.loads(data)
            if record.get("kind") == "AdapterMergeOutputLock":
                return record
        except (ValueError, AttributeError):
            pass
        raise SpecError(self._field, f"{self._lock_path} exists and is not an adaptermerge lock file; "
                                     "it is left alone and nothing is written")

    def _write_record(self) -> None:
        record = {
            "kind": "AdapterMergeOutputLock",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "owner": None if self._owner is None else self._owner.to_json(),
            "pending": self._pending,
        }
        data = json.dumps(record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _remove_leftovers(self, record: dict) -> None:
        pattern = _leftover_pattern(self.output)
        for name in record.get("pending") or []:
            path = self.output.parent / str(name)
            if not pattern.match(str(name)) or not path.is_dir() or path.is_symlink():
                continue
            try:
                check_spares_inputs(path, self._protected, self._field)
            except SpecError as exc:
                log(f"left a crashed run's folder alone: {exc.message}")
                continue
            log(f"removing {path}, left by a run that was killed")
            shutil.rmtree(path)

    def _release(self, keep_record: bool = False) -> None:
        """Drops the lock. The lock file is removed first (while still held, so no one else can hold a
        lock on a removed file unnoticed), unless it must keep its record of folders left to remove."""
        if self._fd is None:
            return
        try:
            if not keep_record:
                os.unlink(self._lock_path)
        finally:
            os.close(self._fd)
            self._fd = None

    # -- publishing --------------------------------------------------------------------------------
    def publish(self, replace: bool) -> None:
        """Moves the finished temp folder into place. replace: an output already there may be replaced
        (the caller decided, on ownership and overwrite); without it, an output that appeared
        meanwhile is left alone and this run fails."""
        _sync_tree(self.tmp)
        if self.output.exists() and not replace:
            raise SpecError(self._field, f"{self.output} appeared during the merge; not replaced")
        termination.begin_commit()
        try:
            if not self.output.exists():
                _rename_no_replace(self.tmp, self.output)
            elif _exchange(self.tmp, self.output):
                self.replaced = True  # self.tmp now holds the previous output, still recorded as pending
            else:
                old = _sibling(self.output, "old")
                self._pending.append(old.name)
                self._write_record()
                os.rename(self.output, old)
                os.rename(self.tmp, self.output)
                self.tmp, self.replaced = old, True
        except BaseException:
            termination.abort_commit()
            raise
        _fsync_path(self.output.parent)

    def close(self) -> None:
        """After publishing: deletes the replaced output and releases the lock. Never raises: the output
        is published; what cannot be removed now stays recorded, and the next run removes it."""
        try:
            if self.replaced:
                shutil.rmtree(self.tmp)
        except OSError as exc:
            log(f"the output is published, but removing the previous one failed ({exc}); "
                "the next run for this output removes it")
        self._release(keep_record=self.tmp.exists())

    def abort(self) -> None:
        """On failure before publishing: removes the temp folder and the lock."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release(keep_record=self.tmp.exists())


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder` (bottom-up), so the rename publishes durable data."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2; False where the kernel or file system does not support the flag."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically; False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_no_replace(source: Path, target: Path) -> None:
    """Renames, failing if target appeared meanwhile (plain rename would replace an empty folder)."""
    if not _renameat2(source, target, _RENAME_NOREPLACE):
        os.rename(source, target)  # still fails (ENOTEMPTY) over a non-empty folder
