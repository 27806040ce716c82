"""gpufleet: llama.cpp's RPC backend, started from the service's own llama-cpp-python install.

A worker of a llamacpp service that spans nodes runs this (roles/inference_server). It is llama.cpp's
`rpc-server` (tools/rpc/rpc-server.cpp of the vendored llama.cpp) without building a second binary: the
wheel's `libggml-rpc.so` exports `ggml_backend_rpc_start_server`, and the devices are chosen as rpc-server
chooses them (every GPU device, else the CPU). The head's llama-cpp-python connects with `rpc_servers`.

The server has no authentication: it binds the worker's fabric address only (never 0.0.0.0).
"""

import argparse
import ctypes
import os
import pathlib
import sys

import llama_cpp  # the service's own install: same pinned source as the head's engine

# ggml-backend.h: enum ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="address to bind (the worker's fabric address)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    rpc_path = lib / "libggml-rpc.so"
    if not rpc_path.exists():
        sys.stderr.write(f"gpufleet-llama-rpc-server: {rpc_path} is missing: the wheel was built without GGML_RPC\n")
        return 2
    rpc = ctypes.CDLL(str(rpc_path))

    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    devices = [
        d
        for d in (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
        if ggml.ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU
    ]
    if not devices:
        cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
        if not cpu:
            sys.stderr.write("gpufleet-llama-rpc-server: no GPU and no CPU backend device\n")
            return 1
        devices = [cpu]

    start = rpc.ggml_backend_rpc_start_server
    start.restype = None
    start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    endpoint = f"{args.host}:{args.port}".encode()
    array = (ctypes.c_void_p * len(devices))(*devices)
    print(f"gpufleet-llama-rpc-server: serving {len(devices)} device(s) on {args.host}:{args.port}", flush=True)
    start(endpoint, None, args.threads, len(devices), array)  # blocks, serving one client at a time
    return 0


if __name__ == "__main__":
    sys.exit(main())
