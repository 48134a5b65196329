"""Writing run files so that no crash, full disk or second process loses a run.

- `write_bytes_atomic` / `write_text_atomic`: a temporary file in the same folder, fsynced,
  then `os.replace`d over the target: a reader sees the old file or the new one, never a
  mixture or an empty file.
- `append_line`: metrics records. A kill can leave a partial last line, which
  `read_jsonl` drops (with a note) instead of failing.
- `write_marker` / `read_marker`: RUN/.loopmdm-run, a JSON record with the run's id that this
  project writes before any other run file; `--overwrite` replaces only a folder holding it.
- `RunLock`: one writer per run directory, `fcntl.flock` on RUN/.lock. The OS releases it when
  the process dies however it dies, so a held lock always means a live writer and its absence
  means every temporary file in the run is stale (`clean_stale`).
- `disk_error`: an OSError while writing becomes one line (ENOSPC: "disk full").
- `fault_point`: the kill-anywhere tests' hook. With LOOPMDM_FAULT_AT=N (or `set_fault`) the
  process calls `os._exit` at the N-th fault point, i.e. in the middle of, or between the
  steps of, a run-file write, exactly like `kill -9` at that instant.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from loopmdm.errors import LoopMDMError

FAULT_ENV = "LOOPMDM_FAULT_AT"
FAULT_EXIT = 137  # what a shell reports for kill -9
LOCK_FILE = ".lock"
LOCK_TAG = "loopmdm run lock"
TMP_MARK = ".tmp-"
MARKER_FILE = ".loopmdm-run"  # written first into every run: what --overwrite recognises
MARKER_KIND = "loopmdm run"

_fault = {"at": int(os.environ.get(FAULT_ENV, "0") or 0), "count": 0, "trace": None}


def set_fault(at: int = 0, trace: list | None = None) -> None:
    """Tests: exit at the `at`-th fault point from now (0 = never); record labels in `trace`."""
    _fault.update(at=at, count=0, trace=trace)


def fault_point(label: str) -> None:
    if not _fault["at"] and _fault["trace"] is None:
        return
    _fault["count"] += 1
    if _fault["trace"] is not None:
        _fault["trace"].append(label)
    if _fault["count"] == _fault["at"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FAULT_EXIT)


def note(message: str) -> None:
    """A one-line notice on stderr (not an error: the command goes on)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- writing

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(f, data: bytes, label: str) -> None:
    """Write `data` to the open binary file `f` in two halves (a fault point between them
    leaves a partial file, as a kill or a full disk would)."""
    half = len(data) // 2
    f.write(data[:half])
    if _fault["at"] or _fault["trace"] is not None:
        f.flush()
        fault_point(f"{label}: partial")
    f.write(data[half:])


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write_all(f, data, f"write {path.name}")
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write {path.name}: complete, not yet renamed")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fault_point(f"write {path.name}: renamed")
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_if_changed(path: Path, text: str) -> None:
    """Atomically replace `path` unless it already holds exactly `text` (fewer writes, fewer
    moments at which a kill could land)."""
    path = Path(path)
    try:
        if path.read_bytes() == text.encode("utf-8"):
            return
    except OSError:
        pass
    write_text_atomic(path, text)


def append_line(path: Path, line: str) -> None:
    with open(path, "ab") as f:
        write_all(f, (line + "\n").encode("utf-8"), f"append {Path(path).name}")
    fault_point(f"append {Path(path).name}: done")


def finite_or_none(value):
    """JSON has no NaN/inf: such values (at any depth) become null, so strict readers parse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file. A partial last line (a write cut short by a kill or a full
    disk) is dropped with a note; a damaged line elsewhere is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LoopMDMError(f"cannot read '{path}': {exc.strerror or exc}") from None
    records = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last:
                note(f"dropped the partial last line of '{path}' (a write that was cut short): {line[:60]!r}")
                continue
            raise LoopMDMError(f"'{path}' line {i + 1} is not a JSON record ({line[:60]!r}); "
                               f"delete that line and run the command again") from None
        records.append(record)
    return records


def disk_error(exc: OSError, what: str, kept: str = "", then: str = "run the command again") -> LoopMDMError:
    """One line for an OSError met while writing `what`: the cause and its remedy (only a full
    disk asks for space; a folder where a file belongs is named as such), what was `kept`,
    and what to do `then`."""
    kept = f"{kept}; " if kept else ""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return LoopMDMError(f"disk full while writing {what} (OSError {errno.errorcode.get(exc.errno, exc.errno)}); "
                            f"{kept}free some space and {then}")
    folder = next((p for p in (exc.filename2, exc.filename) if p is not None and os.path.isdir(p)), None)
    if folder is not None and exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return LoopMDMError(f"cannot write {what}: '{folder}' is a folder, where loopmdm writes a file "
                            f"(OSError {errno.errorcode[exc.errno]}); {kept}move it away and {then}")
    from loopmdm.boundary import os_error_line

    return LoopMDMError(f"cannot write {what}: {os_error_line(exc)}; {kept}{then}")


# --------------------------------------------------------------------------- the run lock

class RunLock:
    """An exclusive `flock` on RUN/.lock for the life of the writer (or until `release`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc, f"the run lock '{self.path}'") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.read(fd, 1000).decode("utf-8", errors="replace").strip().splitlines()
            os.close(fd)
            holder = lines[-1].removeprefix(LOCK_TAG).strip() if lines else ""
            holder = holder or "another process"
            raise LoopMDMError(f"run directory '{self.path.parent}' is in use by another loopmdm process "
                               f"({holder}); wait for it to finish (or stop it), or choose another train.out_dir") from None
        except OSError as exc:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            raise LoopMDMError(f"cannot lock the run directory ('{self.path}': {exc.strerror or exc}); "
                               f"use a train.out_dir on a local file system") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{LOCK_TAG} pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # the lock holds without its description
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def is_our_lock(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LOCK_TAG)).decode("utf-8", errors="replace") == LOCK_TAG or path.stat().st_size == 0
    except OSError:
        return False


def lock_holder(run_dir: Path) -> str | None:
    """Who holds RUN/.lock right now ('pid N on HOST'), or None when nobody does. Probes without
    creating the file, so a folder that is not a run is left as it was."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lines = os.read(fd, 1000).decode("utf-8", errors="replace").strip().splitlines()
        holder = lines[-1].removeprefix(LOCK_TAG).strip() if lines else ""
        return holder or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return None


def in_use_error(run_dir: Path, holder: str) -> LoopMDMError:
    return LoopMDMError(f"run directory '{run_dir}' is in use by another loopmdm process ({holder}); wait for it "
                        f"to finish (or stop it), or choose another train.out_dir")


# --------------------------------------------------------------------------- the run marker

def read_marker(run_dir: Path) -> dict | None:
    """RUN/.loopmdm-run if it is one this project wrote (a JSON object of our kind with a run id)."""
    try:
        with open(Path(run_dir) / MARKER_FILE, "rb") as f:
            record = json.loads(f.read(10_000).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("kind") == MARKER_KIND and isinstance(record.get("run_id"), str):
        return record
    return None


def write_marker(run_dir: Path) -> dict:
    """Mark `run_dir` as a loopmdm run with a new run id (atomically: a kill leaves the old marker,
    the new one, or none and a temporary file of ours)."""
    import time
    import uuid

    record = {"kind": MARKER_KIND, "run_id": uuid.uuid4().hex,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    write_bytes_atomic(Path(run_dir) / MARKER_FILE, (json.dumps(record) + "\n").encode("utf-8"))
    return record


_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.old-(step-\d+)-\d+$")
_TMP_STEP_DIR = re.compile(r"^\.tmp-step-\d+-\d+$")
_TMP_FILE = re.compile(r"^\.(.+)\.tmp-\d+$")  # tmp_name(): `.NAME.tmp-PID`


def is_tmp_of(name: str, names) -> bool:
    """`name` is a temporary file of one of `names`, written by `tmp_name`."""
    m = _TMP_FILE.match(name)
    return bool(m) and m.group(1) in names


def is_checkpoint_entry(name: str) -> bool:
    """What loopmdm writes in RUN/checkpoints: step-N folders, `latest`, and its temporaries."""
    return bool(name == "latest" or _STEP_DIR.match(name) or _OLD_STEP_DIR.match(name)
                or _TMP_STEP_DIR.match(name) or is_tmp_of(name, ("latest", "best.safetensors")))


def clean_stale(run_dir: Path, run_files) -> list[str]:
    """Remove what dead writers left behind (call only while holding the run lock): temporary
    files of `run_files` (`.NAME.tmp-PID`, nothing else), temporary checkpoint folders. A
    checkpoint moved aside while being replaced (`.old-step-N-PID`) is moved back when its
    replacement never arrived."""
    run_dir = Path(run_dir)
    removed = []
    for path in run_dir.glob(f".*{TMP_MARK}*"):
        if path.is_file() and is_tmp_of(path.name, run_files):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    ckpt_root = run_dir / "checkpoints"
    if ckpt_root.is_dir():
        for path in ckpt_root.iterdir():
            old = _OLD_STEP_DIR.match(path.name)
            if old and path.is_dir() and not (ckpt_root / old.group(1)).exists():
                os.replace(path, ckpt_root / old.group(1))
                removed.append(f"{path.name} (restored as {old.group(1)})")
            elif old or _TMP_STEP_DIR.match(path.name) or is_tmp_of(path.name, ("latest", "best.safetensors")):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed
