"""Files and folders the user names on the command line (`pairs --out`, `zeroshot --out`,
`analyze --plots`, `sample-bench --out`): checked before any work starts, never clobbered
unless the command was told to, written atomically (a temporary file in the same folder,
then `os.replace`), and no temporary or empty file is left after any failure, a full disk
included. Torch-free.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from loopmdm.errors import LoopMDMError, require
from loopmdm.runfiles import disk_error, write_bytes_atomic


def _first_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, option: str) -> None:
    """The folders above `path` exist or can be created: the nearest existing one is a
    writable folder."""
    above = _first_existing(path.parent)
    require(above.is_dir(), f"{option} '{path}' cannot be created: '{above}' is a file, not a folder; "
                            f"choose a path in a folder")
    require(os.access(above, os.W_OK | os.X_OK), f"{option} '{path}' cannot be created: no permission to write "
                                                  f"in '{above}'; choose another path")


def check_new_file(text: str, option: str, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """The path of a file a command is about to write: named, not a folder, not an existing
    file (unless `overwrite`), in a folder that exists or can be created."""
    require(text is not None and str(text).strip() != "", f"{option} '' is empty; name the file to write")
    path = Path(text)
    require(not path.is_dir(), f"{option} '{path}' is a folder; name a file to write")
    if path.exists() or path.is_symlink():
        require(overwrite, f"{option} '{path}' already exists; pass {flag} to replace it, or choose a new name")
    _check_creatable(path, option)
    return path


def check_out_dir(text: str, option: str) -> Path:
    """The path of a folder a command writes its (own, fixed-name) files into: named, not a
    file, creatable."""
    require(text is not None and str(text).strip() != "", f"{option} '' is empty; name a folder")
    path = Path(text)
    require(not path.exists() or path.is_dir(), f"{option} '{path}' is a file, not a folder; name a folder")
    if not path.exists():
        _check_creatable(path, option)
    else:
        require(os.access(path, os.W_OK | os.X_OK), f"{option} '{path}': no permission to write in it; choose another folder")
    return path


def write_file(path: Path, data: bytes | str) -> Path:
    """Atomically write `path` (its folder created); an OSError becomes one line naming it, and
    nothing is left behind (neither a temporary nor an empty file)."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise disk_error(exc, f"'{path}'") from None
    return path


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """A matplotlib figure rendered in memory, then written with `write_file`."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    return write_file(path, buf.getvalue())


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file, or one line saying why it is not one (binary, invalid UTF-8, a folder,
    missing, unreadable)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise LoopMDMError(f"{what} '{path}' is a folder, not a file") from None
    except FileNotFoundError:
        raise LoopMDMError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise LoopMDMError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    return decode_text(data, path, what)


def decode_text(data: bytes, path, what: str) -> str:
    """`data` as UTF-8 text; binary content (NUL bytes) and invalid UTF-8 are one line each."""
    nul = data.find(b"\x00")
    require(nul < 0, f"{what} '{path}' is not text (a NUL byte at offset {nul}: a binary file); "
                     f"give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoopMDMError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                           f"convert it to UTF-8") from None


def check_text_file(path: Path, what: str, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text (read in chunks: memory does not grow with its size)."""
    import codecs

    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                nul = data.find(b"\x00")
                require(nul < 0, f"{what} '{path}' is not text (a NUL byte at offset {offset + nul}: a binary file); "
                                 f"give a UTF-8 text file")
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise LoopMDMError(f"{what} '{path}' is not UTF-8 text (invalid byte near offset "
                                       f"{offset + max(exc.start, 0)}); convert it to UTF-8") from None
                if not data:
                    return
                offset += len(data)
    except IsADirectoryError:
        raise LoopMDMError(f"{what} '{path}' is a folder, not a file") from None
    except OSError as exc:
        raise LoopMDMError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
