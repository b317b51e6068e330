"""Writing files without ever losing what the user owns.

Every file mansu writes goes through `atomic_write`: the content goes to a temporary file beside the target,
which is then renamed over it, so a crash leaves the old file or the new one, never half of either. An
existing file is only replaced when mansu wrote it (its JSON files carry `"written_by": "mansu ..."`, its PNG
plots a `Software: mansu` text chunk, its YAML files a first line `# written_by: mansu ...`) or the caller has
claimed the folder it lies in (`replace=True`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import MansuError

WRITTEN_BY = "mansu"  # the mark on mansu's JSON files and PNG plots
_PNG_MARK = b"tEXtSoftware\x00" + WRITTEN_BY.encode()
YAML_MARK = f"# written_by: {WRITTEN_BY}"  # the first line of mansu's YAML files


def written_by_mansu(path: str | os.PathLike) -> bool:
    """Whether the file at `path` carries mansu's mark (JSON reports, PNG plots and YAML files do)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            record = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(record, dict) and str(record.get("written_by", "")).startswith(WRITTEN_BY)
        if path.suffix == ".png":
            with path.open("rb") as f:
                return _PNG_MARK in f.read(1 << 16)  # text chunks come before the image data
        if path.suffix == ".yaml":
            with path.open(encoding="utf-8") as f:
                return f.readline().startswith(YAML_MARK)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def claim(path: str | os.PathLike, replace: bool = False) -> Path:
    """`path` as a file mansu may write: refuses a directory, and an existing file mansu did not write
    (unless `replace`: the caller owns it). Called before long work, so a bad path fails at once."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MansuError(f"{path} is a directory; give a file name")
    if path.exists() and not replace and not written_by_mansu(path):
        raise MansuError(f"{path} already exists and was not written by mansu; mansu never replaces a file it "
                         "did not write: choose another name, or move the file away yourself")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MansuError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    return path


def claim_folder(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """`folder` as one mansu fills with the files `names`: new, empty, or holding only those files (a
    previous run's), whose JSON files mansu wrote. Anything else in it is the user's: refused."""
    folder, names = Path(folder).expanduser(), set(names)
    if folder.exists() and not folder.is_dir():
        raise MansuError(f"{folder} is a file, not a directory")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir()
                         if p.name not in names or (p.suffix == ".json" and not written_by_mansu(p)))
        if foreign:
            raise MansuError(f"{folder} holds files mansu did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory")
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path` (see `claim`)."""
    path = claim(path, replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, replace: bool = False) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace)


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write `obj` as indented JSON atomically, marked as mansu's; NaN is refused so reports stay valid JSON."""
    from . import __version__

    marked = {"written_by": f"{WRITTEN_BY} {__version__}", **obj}
    return write_text(path, json.dumps(marked, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object mansu wrote, without its `written_by` mark."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    record.pop("written_by", None)
    return record
