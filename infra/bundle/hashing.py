"""sha256 of many files, in parallel across cores.

hashlib releases the GIL while it hashes a large buffer, so plain threads scale: one pool hashes
whole files and, for files larger than `PIECE`, independent fixed-size pieces (each piece hash is
in the signed manifest, so verifying pieces proves the bytes just as the whole-file hash does and
lets one big model file use every core).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PIECE = 64 << 20  # 64 MiB: large enough that per-task overhead is noise, small enough to spread work
CHUNK = 8 << 20  # read size; big reads keep syscalls and GIL hand-offs rare


@dataclass(frozen=True)
class Digest:
    """Size, whole-file sha256 and (for files larger than PIECE) per-piece sha256s."""

    size: int
    sha256: str
    pieces: tuple[str, ...] = ()
    piece_size: int = PIECE


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file; never follows a symlink, never blocks on a FIFO.

    Raises:
        OSError: the path is a symlink, FIFO, socket or device, or cannot be opened.

    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    return fd


def _hash_range(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(min(CHUNK, max(length, 1)))
    view = memoryview(buf)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            n = f.readinto(view[: min(len(buf), left)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def workers() -> int:
    """Threads to hash with: one per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def digest_files(paths: Sequence[Path], *, pieces: bool = True, threads: int | None = None,
                 piece_size: int | None = None) -> list[Digest]:
    """Whole-file sha256 (and piece hashes of large files) of every path, in input order.

    Computing both the whole hash and the piece hashes reads large files twice: this is for building
    a bundle. Verification uses `check_files`, which reads every byte once.
    """
    ps = piece_size or PIECE
    sizes = [p.stat().st_size for p in paths]
    with ThreadPoolExecutor(threads or workers()) as pool:
        whole = [pool.submit(_hash_range, p, 0, s) for p, s in zip(paths, sizes, strict=True)]
        piece_futs = [[pool.submit(_hash_range, p, off, min(ps, s - off)) for off in range(0, s, ps)]
                      if pieces and s > ps else [] for p, s in zip(paths, sizes, strict=True)]
        return [Digest(s, w.result(), tuple(f.result() for f in pf), ps)
                for s, w, pf in zip(sizes, whole, piece_futs, strict=True)]


def check_files(expected: Iterable[tuple[Path, Digest]], *, threads: int | None = None) -> list[Path]:
    """Paths whose bytes do not match the expected digest; hashes pieces of large files in parallel."""
    jobs: list[tuple[Path, int, int, str]] = []
    bad: list[Path] = []
    for path, d in expected:
        try:
            st = path.lstat()
            size = st.st_size
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path}: not a regular file")
        except OSError:
            bad.append(path)
            continue
        if size != d.size:
            bad.append(path)
        elif d.pieces:
            ps = d.piece_size
            if ps <= 0 or len(d.pieces) != -(-size // ps):
                bad.append(path)  # pieces that do not tile the file cannot prove it
                continue
            jobs.extend((path, i * ps, min(ps, size - i * ps), h) for i, h in enumerate(d.pieces))
        else:
            jobs.append((path, 0, size, d.sha256))
    # Largest first: the pool ends together instead of waiting on one big file started last.
    jobs.sort(key=lambda j: -j[2])
    def one(j: tuple[Path, int, int, str]) -> tuple[Path, bool]:
        try:
            return j[0], _hash_range(j[0], j[1], j[2]) == j[3]
        except OSError:
            return j[0], False  # replaced by a non-regular file (or vanished) since it was listed

    with ThreadPoolExecutor(threads or workers()) as pool:
        results = list(pool.map(one, jobs))
    bad.extend(p for p, ok in results if not ok)
    return sorted(set(bad))
