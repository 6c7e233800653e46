"""Which folders sdsprune may write, replace or clean up: the one place for those rules.

A command replaces a folder only when the user asked for it (``--overwrite``) and never one
that overlaps what the run reads or the user works in: the current directory, the home
folder, the source model, the sdsprune cache or the run's state folder. A state folder is
one sdsprune made (it carries a marker file), and cleaning it up deletes only the files
sdsprune wrote there. Every command goes through these functions, so that the rules cannot
drift apart between commands, and every check runs before any expensive work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError

from sdsprune.errors import SdspruneError

STATE_MARKER = ".sdsprune-state"
EVERY_OVERLAP = ("is", "is inside", "contains")
LOCK_SUFFIX = ".sdsprune-lock"
# A full disk or a denied write: safetensors reports them as its own error, not as OSError.
WRITE_ERRORS = (OSError, SafetensorError)


def describe_write_error(exc: BaseException) -> str:
    """The reason a write failed, without the traceback (``No space left on device``)."""
    return getattr(exc, "strerror", None) or str(exc)


def overlap(path: str | Path, other: str | Path) -> str | None:
    """How ``path`` relates to ``other`` once links and ``..`` are resolved: ``is``,
    ``is inside``, ``contains`` or None (deleting one then cannot touch the other)."""
    mine, theirs = _real(path), _real(other)
    if mine == theirs:
        return "is"
    if theirs in mine.parents:
        return "is inside"
    if mine in theirs.parents:
        return "contains"
    return None


def check_output_folder(
    out: str | Path, *, overwrite: bool, protected: Mapping[str, str | Path | None] = {}
) -> Path:
    """Refuse, before any work, an ``--out`` that this run may not create or replace.

    ``protected`` names what the run reads (label -> path, e.g. the source model); the
    sdsprune cache is always protected. Returns the output path, ``~`` expanded.
    """
    from sdsprune.utils import cache_dir

    path = _named_path(out, "--out")
    _refuse_overlaps(path, "--out", {"the sdsprune cache": cache_dir(), **protected})
    _refuse_replacing(path, overwrite)
    return path


def check_output_file(
    out: str | Path,
    *,
    overwrite: bool,
    flag: str = "--out",
    protected: Mapping[str, str | Path | None] = {},
) -> Path:
    """Refuse, before any work, a report file (``bench --out``) that would replace a user's
    file without ``overwrite``, name a folder, or land in what the run reads or the cache.

    Checked up front so that a long run does not end in a write that was never possible.
    """
    from sdsprune.utils import cache_dir

    path = _named_path(out, flag, what="file")
    _refuse_overlaps(path, flag, {"the sdsprune cache": cache_dir(), **protected})
    if path.is_dir():
        raise SdspruneError(f"{flag} {path} is a folder; name the file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise SdspruneError(f"{flag} {path} already exists (pass --overwrite to replace it)")
    blocking = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise SdspruneError(f"cannot write {flag} {path}: {blocking} is not a folder")
    return path


def write_file_atomic(path: str | Path, text: str, *, overwrite: bool, flag: str = "--out") -> Path:
    """Write ``text`` to a hidden sibling, then move it to ``path`` in one step.

    Readers see the old file or the new one, never half of it. Without ``overwrite`` the
    move is a hard link, which fails if ``path`` appeared meanwhile (another run or the
    user), so an existing file is never replaced unasked. A failed write leaves nothing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        _place_file(tmp, path, overwrite, flag)
    except WRITE_ERRORS as exc:
        raise SdspruneError(f"could not write {path}: {describe_write_error(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _place_file(tmp: Path, path: Path, overwrite: bool, flag: str) -> None:
    """Rename ``tmp`` onto ``path`` (``overwrite``), or link it there only if it is free."""
    if path.is_dir():
        raise SdspruneError(f"{flag} {path} is a folder; name the file to write")
    if overwrite:
        os.replace(tmp, path)
        return
    taken = SdspruneError(
        f"{flag} {path} was created by someone else while this run worked; it was left "
        "as it is (pass --overwrite to replace it)"
    )
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise taken from exc
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists() or path.is_symlink():
            raise taken from None
        os.replace(tmp, path)


def check_state_folder(
    state_dir: str | Path, *, protected: Mapping[str, str | Path | None] = {}
) -> Path:
    """Refuse, before any work, a ``--state-dir`` that sdsprune did not make, or one that
    overlaps the output or the source (its cleanup would then delete them)."""
    path = _named_path(state_dir, "--state-dir")
    _refuse_overlaps(path, "--state-dir", protected)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SdspruneError(f"--state-dir {path} exists and is not a folder")
    if path.exists() and not is_state_folder(path) and any(path.iterdir()):
        raise SdspruneError(_foreign_state_message(path))
    return path


def claim_work_folder(
    folder: str | Path,
    *,
    flag: str,
    marker: str,
    earlier_signs: tuple[str, ...] = (),
    protected: Mapping[str, str | Path | None] = {},
) -> Path:
    """A folder a command keeps adding to and rewrites files in (``compare --out``): a new
    or empty one is created and marked; an existing one must carry ``marker`` or, when made
    before markers existed, one of ``earlier_signs``. A folder of other files is refused,
    so that no file of the user's is ever overwritten."""
    path = _named_path(folder, flag)
    _refuse_overlaps(path, flag, protected)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SdspruneError(f"{flag} {path} exists and is not a folder")
    ours = (path / marker).is_file() or any((path / sign).exists() for sign in earlier_signs)
    if path.exists() and any(path.iterdir()) and not ours:
        raise SdspruneError(
            f"{flag} {path} holds files sdsprune did not write; name a new folder (sdsprune "
            "creates it) or one an earlier run of this command wrote"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / marker).touch()
    except OSError as exc:
        raise SdspruneError(f"cannot create {flag} {path}: {exc.strerror or exc}") from exc
    return path


def is_state_folder(folder: str | Path) -> bool:
    """Whether sdsprune made ``folder`` as a run's state folder (its marker is there)."""
    return (Path(folder) / STATE_MARKER).is_file()


def claim_state_folder(folder: str | Path) -> None:
    """Create the state folder (or adopt an empty one) and mark it as sdsprune's own."""
    path = Path(folder)
    if is_state_folder(path):
        return
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not created and any(path.iterdir()):
            raise SdspruneError(_foreign_state_message(path))
        marker = {"what": "sdsprune run state", "created_folder": created}
        (path / STATE_MARKER).write_text(json.dumps(marker) + "\n")
    except OSError as exc:
        raise SdspruneError(f"cannot create state folder {path}: {exc.strerror or exc}") from exc


def remove_state_folder(folder: str | Path, files: Iterable[str], subfolders: Iterable[str]):
    """Delete the files sdsprune wrote into a state folder (glob ``files``), then the
    ``subfolders`` and the folder itself if they are empty and sdsprune created them.

    Anything else a user put there stays, and a folder without the marker is left alone.
    """
    path = Path(folder)
    if not is_state_folder(path):
        return
    for pattern in files:
        for file in path.glob(pattern):
            if file.is_file() or file.is_symlink():
                file.unlink(missing_ok=True)
    for pattern in subfolders:
        for sub in path.glob(pattern):
            _remove_if_empty(sub)
    created = _marker(path).get("created_folder", False)
    (path / STATE_MARKER).unlink(missing_ok=True)
    if created:
        _remove_if_empty(path)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``out`` only if the block finishes.

    Writing into a sibling temporary folder and renaming it at the end means a crash,
    a full disk or Ctrl-C never leaves a half-written checkpoint where the user expects one.
    The final move holds a lock beside ``out`` and checks again that ``out`` is free, so
    of two runs writing the same folder without ``overwrite`` one wins and the other fails.
    """
    path = _named_path(out, "--out")
    _refuse_replacing(path, overwrite)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's private 0700 would stay on the output
    except OSError as exc:
        raise SdspruneError(f"cannot create output folder next to {path}: {exc.strerror}") from exc
    try:
        yield tmp
        _move_into_place(tmp, path, overwrite)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SdspruneError(f"could not write {path}: {describe_write_error(exc)}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``path`` under the lock; an existing ``path`` (allowed only with
    ``overwrite``) is first renamed aside, so readers see the old or the new folder whole."""
    with _lock_beside(path):
        if not (path.exists() or path.is_symlink()):
            os.rename(tmp, path)
            return
        if not overwrite:
            raise SdspruneError(
                f"output folder {path} was created by someone else while this run worked; "
                "it was left as it is (pass --overwrite to replace it)"
            )
        aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(aside, path)
            raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _lock_beside(path: Path) -> Iterator[None]:
    """An exclusive lock on a hidden file next to ``path``, removed when released.

    ``flock`` dies with its process (no stale locks after a kill). The holder deletes the
    file before releasing, so a waiter that opened the old file retries on the new one.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename alone decides
        yield
        return
    lock = path.with_name(f".{path.name}{LOCK_SUFFIX}")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        current = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _named_path(value: str | Path, flag: str, what: str = "folder") -> Path:
    """The path an output option names; an empty name (which would mean the current
    directory) and the user's working context are refused whatever the command."""
    if not str(value).strip():
        raise SdspruneError(f"{flag} is empty: name the {what} to write")
    path = Path(value).expanduser()
    context = {
        "the current directory": Path.cwd(),
        "your home folder": Path.home(),
        "the filesystem root": Path(path.anchor or "/"),
    }
    _refuse_overlaps(path, flag, context, relations=("is", "contains"))
    return path


def _refuse_overlaps(
    path: Path,
    flag: str,
    protected: Mapping[str, str | Path | None],
    relations: tuple[str, ...] = EVERY_OVERLAP,
) -> None:
    for label, other in protected.items():
        if other is None or not str(other):
            continue
        relation = overlap(path, other)
        if relation in relations:
            raise SdspruneError(
                f"refusing {flag} {path}: it {relation} {label} ({other}); "
                "choose a folder apart from it"
            )


def _refuse_replacing(path: Path, overwrite: bool) -> None:
    if path.is_symlink():
        raise SdspruneError(f"output {path} is a symbolic link; name a real folder")
    if path.exists() and not path.is_dir():
        raise SdspruneError(f"output {path} exists and is not a folder")
    if path.exists() and not overwrite:
        raise SdspruneError(f"output folder {path} already exists (pass --overwrite to replace it)")


def _foreign_state_message(path: Path) -> str:
    return (
        f"--state-dir {path} holds files sdsprune did not write; name a new folder "
        "(sdsprune creates it) or the state folder of an interrupted run"
    )


def _marker(folder: Path) -> dict:
    try:
        data = json.loads((folder / STATE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()
