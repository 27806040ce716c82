"""gpufleet: llama.cpp across nodes through its RPC backend, from the service's own llama-cpp-python install.

  gpufleet-llama-rpc worker --host ADDR --port PORT
      llama.cpp's `rpc-server` (tools/rpc/rpc-server.cpp of the vendored llama.cpp) without building a second
      binary: the wheel's libggml-rpc exports `ggml_backend_rpc_start_server`; the devices are chosen as
      rpc-server chooses them (every GPU device, else the CPU). It has no authentication: ADDR is the
      worker's fabric address, never 0.0.0.0.
  gpufleet-llama-rpc head --rpc HOST:PORT[,HOST:PORT…] -- SERVER-ARGS…
      registers each worker as a ggml device (what llama.cpp's `--rpc` does: `ggml_backend_rpc_add_server`
      then `ggml_backend_register`, common/arg.cpp) and runs `python -m llama_cpp.server SERVER-ARGS`, whose
      model then loads its layers onto the workers. llama-cpp-python 0.3.36 accepts an `rpc_servers` setting
      but never uses it, hence this.

The libraries are opened by the names libllama links them under (`libggml.so.0`): a second copy of libggml
would keep a device registry of its own, and the model would never see the workers.
"""

import argparse
import ctypes
import os
import pathlib
import runpy
import sys

import llama_cpp  # the service's own install: same pinned source as the head's engine

# ggml-backend.h: enum ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
_IOLBF = 1  # glibc stdio.h


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    rpc_path = lib / "libggml-rpc.so.0"
    if not rpc_path.exists():
        sys.exit(f"gpufleet-llama-rpc: {rpc_path} is missing: the wheel was built without GGML_RPC")
    ggml = ctypes.CDLL(str(lib / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(rpc_path))
    v = ctypes.c_void_p
    for name, restype, argtypes in (
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", v, [ctypes.c_size_t]),
        ("ggml_backend_dev_type", ctypes.c_int, [v]),
        ("ggml_backend_dev_by_type", v, [ctypes.c_int]),
        ("ggml_backend_register", None, [v]),
    ):
        fn = getattr(ggml, name)
        fn.restype, fn.argtypes = restype, argtypes
    rpc.ggml_backend_rpc_add_server.restype = v
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(v)
    ]
    return ggml, rpc


def worker(args: argparse.Namespace) -> int:
    # ggml logs with C stdio, block-buffered into the journal: line-buffer it, so "Accepted client
    # connection" shows when it happens.
    libc = ctypes.CDLL(None)
    libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, _IOLBF, 0)
    ggml, rpc = _libs()
    devices = [
        d
        for d in (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
        if ggml.ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU
    ]
    if not devices:
        cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
        if not cpu:
            sys.exit("gpufleet-llama-rpc: no GPU and no CPU backend device")
        devices = [cpu]
    array = (ctypes.c_void_p * len(devices))(*devices)
    print(f"gpufleet-llama-rpc: worker serving {len(devices)} device(s) on {args.host}:{args.port}", flush=True)
    rpc.ggml_backend_rpc_start_server(f"{args.host}:{args.port}".encode(), None, args.threads, len(devices), array)
    return 1  # the server only returns when it could not start (its reason is on stderr)


def head(args: argparse.Namespace) -> int:
    ggml, rpc = _libs()
    for endpoint in args.rpc.split(","):
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            sys.exit(f"gpufleet-llama-rpc: cannot add the RPC backend {endpoint}")
        ggml.ggml_backend_register(reg)
    print(f"gpufleet-llama-rpc: head with RPC backends {args.rpc}", flush=True)
    sys.argv = ["llama_cpp.server", *args.server_args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="gpufleet-llama-rpc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker", help="serve this node's devices to a head over TCP")
    w.add_argument("--host", required=True, help="address to bind: the worker's fabric address")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    w.set_defaults(func=worker)
    h = sub.add_parser("head", help="run llama_cpp.server with the workers as devices")
    h.add_argument("--rpc", required=True, help="HOST:PORT of each worker, comma-separated")
    h.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then llama_cpp.server's arguments")
    h.set_defaults(func=head)
    args = p.parse_args()
    if args.role == "head" and args.server_args[:1] == ["--"]:
        args.server_args = args.server_args[1:]
    if args.role == "worker" and args.threads <= 0:
        args.threads = os.cpu_count() or 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
