"""Benchmark hook: `gpufleet bundle verify` throughput against `sha256sum` on the same files.

`verify_throughput()` builds a signed bundle of `size` bytes (one large model file plus many
package-sized files — the shape of a real air-gap bundle), warms the page cache, then times
`sha256sum` over the files and `verify_bundle` over the bundle alternately, so machine noise hits
both alike. The benchmark harness (`infra/bench`) calls it; it can also run alone:
`python -m infra.bench.bundle [GiB]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.bench.harness import Context, Measurement, Ratio, interleave
from infra.bundle.hashing import workers
from infra.bundle.manifest import bundle_files, verify_bundle, write_manifest
from infra.bundle.signing import generate_key

GIB = 1 << 30


def make_data(root: Path, size: int) -> list[Path]:
    """Half the bytes in one model file, the rest in 32 MiB package-sized files (random bytes)."""
    out = []
    model = root / "files/models/bench/r1/model.gguf"
    model.parent.mkdir(parents=True, exist_ok=True)
    sizes = [("files/models/bench/r1/model.gguf", size // 2)]
    rest, i = size - size // 2, 0
    while rest > 0:
        n = min(32 << 20, rest)
        sizes.append((f"apt/pkg{i:03d}_1.0_amd64.deb", n))
        rest, i = rest - n, i + 1
    (root / "apt").mkdir(exist_ok=True)
    block = os.urandom(1 << 20)
    for rel, n in sizes:
        p = root / rel
        with p.open("wb") as f:
            for off in range(0, n, len(block)):
                f.write(block[: min(len(block), n - off)] if off else os.urandom(min(len(block), n)))
        out.append(p)
    return out


def verify_throughput(size: int = GIB, repeats: int = 3, work: Path | None = None) -> dict[str, Any]:
    """Median seconds and MB/s of `sha256sum` vs `verify_bundle` on the same ≥`size` bytes, and the ratio."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-bundle-", dir=work) as tmp:
        t = Path(tmp)
        bundle = t / "bundle"
        bundle.mkdir()
        make_data(bundle, size)
        sec, pub = t / "k.sec", t / "k.pub"
        generate_key(t / "gnupg", "gpufleet bench <bench@lab.invalid>", sec, pub)
        write_manifest(bundle, "bench", None, "0" * 64, [], sec)
        files = [str(bundle / r) for r in bundle_files(bundle)]
        total = sum(os.path.getsize(f) for f in files)

        def sha256sum() -> None:
            subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL, timeout=600)

        def verify(threads: int | None = None) -> None:
            _, problems = verify_bundle(bundle, pub, threads)
            if problems:
                raise RuntimeError(f"benchmark bundle does not verify: {problems}")

        def openssl() -> None:
            subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, stdout=subprocess.DEVNULL,
                           timeout=600)

        sha256sum()  # warm the page cache: both read from memory, so this compares hashing, not disk
        # One thread, and `openssl dgst` (one process, SHA-NI like hashlib): they show how much of the
        # speed-up is parallelism and how much is the faster sha256 code coreutils lacks.
        fns = {"sha256sum": sha256sum, "verify": verify, "verify1": lambda: verify(1)}
        if shutil.which("openssl"):
            fns["openssl"] = openssl
        m = interleave(fns, repeats)
        mb = total / 1e6
        return {
            "bytes": total,
            "threads": workers(),
            "sha256sum": m["sha256sum"],
            "bundle verify": m["verify"],
            "sha256sum MB/s": f"{mb / m['sha256sum'].median:.0f}",
            "bundle verify MB/s": f"{mb / m['verify'].median:.0f}",
            "bundle verify, 1 thread": m["verify1"],
            "parallel gain": Ratio(m["verify1"], m["verify"], "1-thread verify time / parallel verify time"),
            **({"openssl dgst -sha256 (1 process)": m["openssl"],
                "speed-up vs openssl": Ratio(m["openssl"], m["verify"], "openssl time / bundle verify time")}
               if "openssl" in m else {}),
            "speed-up": Ratio(m["sha256sum"], m["verify"], "sha256sum time / bundle verify time",
                              goal="≥ 1.5× on 2 cores"),
        }


def bundle_verify_figure(ctx: Context) -> dict[str, Any]:
    """The harness figure: 1 GiB (quick mode: 128 MiB), `ctx.repeats` (at most 3) alternating runs."""
    return verify_throughput(GIB // 8 if ctx.quick else GIB, max(min(ctx.repeats, 3), 1))


def main() -> None:
    """Print the figures (GiB from argv[1], default 1)."""
    size = int(float(sys.argv[1]) * GIB) if len(sys.argv) > 1 else GIB
    for k, v in verify_throughput(size).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()

__all__ = ["Measurement", "verify_throughput"]
