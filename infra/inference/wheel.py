"""The llama-cpp-python wheel the llamacpp engine installs: built once per machine from the PyPI sdist.

PyPI ships llama-cpp-python only as an sdist (its CPU wheels live on a separate index we cannot reach),
so the lab and the air-gap bundle build it here, once, and publish the file to the segment's file store.
The build is CPU-only and portable: `GGML_NATIVE=OFF` so a wheel built on this machine runs on any
x86-64 node, no OpenMP/OpenSSL so the node needs no libgomp/libssl, and no tests, tools, examples or
multimodal library so the build stays short (measured figure in docs/inference.md).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# THE pin of the llama-cpp-python release (the lab stack's service `wheel` URL names the same file).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
WHEEL_CACHE = Path(os.environ.get("GPUFLEET_WHEEL_CACHE", "/var/cache/gpufleet/wheels"))

# CPU-only, portable, minimal: see the module docstring for why each switch is here.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_BLAS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAVA_BUILD=OFF",
    # llama.cpp's RPC backend (libggml-rpc.so): the workers of a service spanning nodes serve layers with it.
    "-DGGML_RPC=ON",
    # Its RDMA transport is auto-enabled when the build machine has libibverbs, which would make every node
    # that installs this one wheel need libibverbs too: off, so the wheel does not depend on the build host.
    "-DGGML_RPC_RDMA=OFF",
)
# A cold build on 2 shared cores takes minutes, not hours; anything longer is a hung compiler or pip.
BUILD_TIMEOUT_S = 3600


class WheelBuildError(RuntimeError):
    """The sdist could not be fetched or built (message carries the tail of the build log)."""


@dataclass(frozen=True)
class WheelBuild:
    """Where the wheel is and what it cost (0 s when it came from the cache)."""

    path: Path
    seconds: float
    cached: bool


def wheel_name(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """File name of the wheel for this interpreter (CPython 3.11 on the nodes: Debian 12)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"llama_cpp_python-{version}-{tag}-{tag}-linux_x86_64.whl"


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float, log: Path) -> None:
    with log.open("ab") as out:
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WheelBuildError(f"{cmd[2:5]} timed out after {timeout:.0f} s; log: {log}") from exc
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise WheelBuildError(f"{' '.join(cmd[:5])} … exited {proc.returncode}; log {log}:\n{tail}")


def missing_build_tools() -> list[str]:
    """Debian packages the build needs but this machine lacks (CMake and Ninja come from PyPI if absent)."""
    return [pkg for tool, pkg in (("cc", "gcc"), ("c++", "g++")) if shutil.which(tool) is None]


def build_llama_wheel(dest: Path, *, version: str = LLAMA_CPP_PYTHON_VERSION,
                      timeout: float = BUILD_TIMEOUT_S, jobs: int | None = None) -> Path:
    """Download the sdist with pip and build the CPU-only wheel into `dest` (no cache check)."""
    if missing := missing_build_tools():
        raise WheelBuildError(f"cannot build llama-cpp-python: no C/C++ toolchain; apt-get install {' '.join(missing)}")
    deadline = time.monotonic() + timeout
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpufleet-llama-") as tmp:
        work = Path(tmp)
        log = dest / f"build-{version}.log"
        log.write_bytes(b"")
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(CMAKE_ARGS)
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 1)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        pip = [sys.executable, "-m", "pip"]
        _run([*pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
              "-d", str(work / "sdist")], env=env, cwd=work, timeout=deadline - time.monotonic(), log=log)
        sdists = sorted((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise WheelBuildError(f"expected one sdist, found {[s.name for s in sdists]}")
        # `wheel.py-api=` (empty) tags the wheel for this interpreter (cp311-cp311), which is the name
        # the stacks publish; upstream's default tag would be py3-none.
        _run([*pip, "wheel", "--no-deps", "--config-settings=wheel.py-api=", "-w", str(work / "out"),
              str(sdists[0])], env=env, cwd=work, timeout=deadline - time.monotonic(), log=log)
        built = sorted((work / "out").glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise WheelBuildError(f"expected one wheel, found {[b.name for b in built]}")
        target = dest / built[0].name
        # Copy then rename: a reader never sees a half-written wheel.
        partial = target.with_suffix(".whl.partial")
        shutil.copyfile(built[0], partial)
        partial.replace(target)
        return target


def build_flags() -> str:
    """What a cached wheel must have been built with (written beside it): other flags mean rebuild."""
    return "\n".join(CMAKE_ARGS) + "\n"


def _flags_file(cache: Path) -> Path:
    return cache / f"{wheel_name()}.cmake-args"


def wheel_cached(cache: Path | None = None) -> bool:
    """Is the wheel already built in the cache with today's CMake flags (no build on the next `ensure_*`)."""
    cache = cache or WHEEL_CACHE
    flags = _flags_file(cache)
    return (cache / wheel_name()).is_file() and flags.is_file() and flags.read_text(encoding="utf-8") == build_flags()


def ensure_llama_wheel_build(cache: Path | None = None, *, timeout: float = BUILD_TIMEOUT_S) -> WheelBuild:
    """Return the cached wheel, building it first if missing (one build at a time per machine)."""
    cache = cache or WHEEL_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / wheel_name()
    if wheel_cached(cache):
        return WheelBuild(target, 0.0, True)
    # A file lock so the lab seeding, the bundle and a test running at once build it only once.
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wheel_cached(cache):
            return WheelBuild(target, 0.0, True)
        start = time.monotonic()
        built = build_llama_wheel(cache, timeout=timeout)
        if built != target:
            raise WheelBuildError(f"built {built.name}, expected {target.name}")
        _flags_file(cache).write_text(build_flags(), encoding="utf-8")
        return WheelBuild(target, time.monotonic() - start, False)


def ensure_llama_wheel(cache: Path | None = None, *, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Path of the llama-cpp-python wheel under /var/cache/gpufleet/wheels/, built once per machine."""
    return ensure_llama_wheel_build(cache, timeout=timeout).path


# The server's own dependencies (`llama_cpp_python[server]`: uvicorn, fastapi, sse-starlette, …) for the
# nodes' interpreter: Debian 12 ships CPython 3.11 on glibc 2.36.
NODE_PYTHON = "3.11"
NODE_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux2014_x86_64", "linux_x86_64")
SERVER_REQUIREMENT = f"llama_cpp_python[server]=={LLAMA_CPP_PYTHON_VERSION}"
# Exact dependency versions, so every machine assembles the same wheelhouse (and the lock the same hashes).
SERVER_CONSTRAINTS = Path(__file__).with_name("server-constraints.txt")


def ensure_server_wheelhouse(cache: Path | None = None, *, timeout: float = 600) -> Path:
    """A directory with the llama-cpp-python wheel and every wheel `[server]` needs (once per machine).

    Nodes install with `pip install --no-index --find-links <dir> "llama_cpp_python[server]==0.3.36"`;
    this directory is what the file stores must serve next to the wheel (`files/wheels/`).
    """
    cache = cache or WHEEL_CACHE
    wheel = ensure_llama_wheel(cache)
    house = cache / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}"
    done = house / ".complete"
    # The marker names the wheel's build flags too: a rebuilt wheel (new flags) replaces the house's copy.
    marker = SERVER_REQUIREMENT + "\n" + build_flags()
    if done.is_file() and done.read_text(encoding="utf-8") == marker:
        return house
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file() and done.read_text(encoding="utf-8") == marker:
            return house
        house.mkdir(parents=True, exist_ok=True)
        log = cache / f"wheelhouse-{LLAMA_CPP_PYTHON_VERSION}.log"
        log.write_bytes(b"")
        platforms = [arg for p in NODE_PLATFORMS for arg in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "--only-binary", ":all:", *platforms,
              "--python-version", NODE_PYTHON, "--implementation", "cp", "--find-links", str(cache),
              "--constraint", str(SERVER_CONSTRAINTS),
              "-d", str(house), SERVER_REQUIREMENT],
             env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, cwd=cache, timeout=timeout, log=log)
        shutil.copyfile(wheel, house / wheel.name)  # always: the cached wheel may have been rebuilt
        done.write_text(marker, encoding="utf-8")
    return house
