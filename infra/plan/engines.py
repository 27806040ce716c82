"""Each engine's invocation as code: the argv, environment and container options of a service.

The `inference_server` role only *places* what this module computes. Everything here is pure and
computed from the plan, so the same plan always gives the same unit, and the tests can check each
engine's argv against the engine's own flag definitions (vLLM: the real package; TGI: its documented
launcher flags) and that every plan limit is on the command line.

Values from the stack are hostile (issue 16): this is the second layer behind the model's grammars.
Every word is quoted for systemd by `systemd_word` (systemd.syntax(7), "Quoting"; `%` → `%%`,
`$` → `$$`, no raw control character ever), values go after `=` in the option word itself so none
can become an option of its own, and a model directory is always inside the model root.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from infra.model.site import ContainerEngine, DType, Engine, InferenceService, KvCacheDType, parse_hf_source

MODEL_ROOT = "/var/lib/gpufleet/models"
"""Model store on a node: one directory per model name and revision."""
VENV_ROOT = "/opt/gpufleet/inference"
"""Native (llama.cpp) engines: one venv per service under this directory."""
RPC_PROGRAM = "/usr/local/libexec/gpufleet-llama-rpc"
"""The program the inference_server role installs on the nodes of a spanning llamacpp service: `worker`
starts ggml's RPC server, `head` registers the workers as devices and runs llama_cpp.server (both from the
service's own llama-cpp-python install)."""
CONTAINER_MODEL_DIR = "/models"
"""Where a service's model directory is mounted (read-only) inside its container."""
RUNTIME_BIN: dict[ContainerEngine, str] = {
    ContainerEngine.PODMAN: "/usr/bin/podman",
    ContainerEngine.DOCKER: "/usr/bin/docker",
}
"""Runtimes that run inference containers. containerd is not one: its `ctr` is a debug client
without CDI (Debian 12's 1.6.20), and nerdctl is not packaged for Debian 12."""
DOCKER_CDI_MAJOR = 25
"""Docker takes CDI device names (`--device nvidia.com/gpu=all`) from 25.0 on (daemon feature `cdi`);
older daemons get the GPUs through the NVIDIA runtime (`--runtime=nvidia --gpus=all`)."""

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
"""Every engine runs offline: nothing reaches a hub, nothing reports usage. An `hf://` model is on the
node before the engine starts (locked, bundled, served by the mirror), so the engines load it from the
model directory and never need the hub (huggingface_hub reads HF_HUB_OFFLINE, transformers its own)."""

MIRROR_MODELS = "files/models"
"""Where a mirror (and a bundle) keeps model files: `<this>/<name>/<revision>/<file path in the repo>`."""
MIRROR_MODEL_INDEX = "files/model-index"
"""Where a mirror keeps, per `hf://` model, the list of its files with sha256 (written by `gpufleet bundle
build` from the lock): `<this>/<name>/<revision>.json`. Beside, not inside, the model directory, so no
repository file can collide with it and the engine never sees it."""


def mirror_model_dir(name: str, revision: str) -> str:
    """`files/models/<name>/<revision>`: one model revision on the mirror and in a bundle."""
    return posixpath.join(MIRROR_MODELS, _component(name, "model name"), _component(revision, "revision"))


def mirror_model_index(name: str, revision: str) -> str:
    """`files/model-index/<name>/<revision>.json`: the file list a node fetches an `hf://` model by."""
    leaf = _component(revision, "revision") + ".json"
    return posixpath.join(MIRROR_MODEL_INDEX, _component(name, "model name"), leaf)


# Where each engine answers "ready"; the role polls it after (re)starting the service.
HEALTH_PATHS: dict[Engine, str] = {
    Engine.VLLM: "/health",
    Engine.TGI: "/health",
    Engine.LLAMACPP: "/v1/models",
}

# vLLM 0.33: `--dtype` choices are `ModelDType` (vllm/config/model.py), `--quantization` choices are
# `QuantizationMethods` (vllm/model_executor/layers/quantization/__init__.py); both checked in tests.
_VLLM_DTYPE: dict[DType, tuple[str, str]] = {
    DType.BF16: ("--dtype", "bfloat16"),
    DType.FP16: ("--dtype", "float16"),
    DType.FP8: ("--quantization", "fp8"),
    DType.AWQ: ("--quantization", "awq"),
    DType.GPTQ: ("--quantization", "gptq"),
    # Online int8 weight-only quantisation of a 16-bit checkpoint: 1 byte a weight, as the planner counts.
    DType.INT8: ("--quantization", "int8_per_channel_weight_only"),
}
# vLLM `--kv-cache-dtype` choices are `CacheDType` (vllm/config/cache.py).
_VLLM_KV: dict[KvCacheDType, str] = {
    KvCacheDType.AUTO: "auto",
    KvCacheDType.FP16: "float16",
    KvCacheDType.BF16: "bfloat16",
    KvCacheDType.FP8: "fp8",
}
# TGI launcher: `--dtype` (float16, bfloat16) cannot be combined with `--quantize`.
_TGI_DTYPE: dict[DType, tuple[str, str]] = {
    DType.BF16: ("--dtype", "bfloat16"),
    DType.FP16: ("--dtype", "float16"),
    DType.FP8: ("--quantize", "fp8"),
    DType.AWQ: ("--quantize", "awq"),
    DType.GPTQ: ("--quantize", "gptq"),
    DType.INT8: ("--quantize", "bitsandbytes"),
    DType.INT4: ("--quantize", "bitsandbytes-nf4"),
}
_TGI_KV: dict[KvCacheDType, str] = {KvCacheDType.FP8: "fp8_e4m3fn"}

# A path component of the model store: no separator, no dot-only name, nothing a shell or unit sees
# as special. The model's grammar is stricter; this is the floor every value must still meet here.
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
# An image by digest with nothing that can become a word or an option of the runtime.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*@sha256:[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


class EngineError(ValueError):
    """The plan asks for something the engine or runtime cannot do, or a value is unsafe to place."""


@dataclass(frozen=True)
class Raw:
    """A word placed without quoting: only for systemd specifiers this module writes itself (`%N`)."""

    text: str


Word = str | Raw


@dataclass(frozen=True)
class NodeRank:
    """One node's place in a vLLM service spanning nodes (vLLM's multiprocessing multi-node mode).

    vLLM 0.33 `vllm serve` on every node with the same model and parallel sizes plus `--nnodes`,
    `--node-rank`, `--master-addr` (the head's address, where rank 0 opens torch.distributed's store on
    `--master-port`), and `--headless` on every other node: those run only their GPU workers, no API server
    (vllm docs/serving/parallelism_scaling.md, "Running vLLM with MultiProcessing"; the flags are
    `ParallelConfig.nnodes/node_rank/master_addr/master_port` in vllm/config/parallel.py and `--headless` in
    vllm/entrypoints/cli/serve.py). Not Ray: the multiprocessing route needs no cluster daemon on the nodes,
    each node's unit is the engine itself, and a node's rank is a plan value rather than Ray's placement.
    """

    rank: int
    nnodes: int
    master_addr: str
    """The head's fabric address: the group's traffic stays on the fabric (vLLM's docs: it is unencrypted
    and must face a private network only)."""
    master_port: int
    host_ip: str
    """This node's fabric address, as VLLM_HOST_IP: what the node tells its peers to connect to."""


@dataclass(frozen=True)
class UnitCommands:
    """What the unit of one service runs: each command an argv, placed by the role's template."""

    exec_start: tuple[Word, ...]
    exec_start_pre: tuple[tuple[Word, ...], ...] = ()
    """Clean-up commands before the start; each may fail (placed with systemd's `-` prefix)."""
    exec_stop: tuple[tuple[Word, ...], ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    user: str = ""


# --- systemd quoting -------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_./:=,+@-]+$")
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(c: str, *, dollar: bool) -> str:
    if c in _C_ESCAPES:
        return _C_ESCAPES[c]
    if c == "%":
        return "%%"  # specifier expansion runs on the whole line first
    if c == "$" and dollar:
        return "$$"  # environment variable substitution in command lines
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02x}"  # one byte: \xHH is a byte in systemd, right for ASCII only
    if ord(c) > 0x7E and not c.isprintable():
        # Bidi overrides and other invisible code points: spelt out, never placed raw.
        return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
    return c


def systemd_word(word: Word, *, dollar: bool = True) -> str:
    """One argv word as a unit's command line reads it back exactly (systemd.syntax(7), "Quoting").

    Plain words stay as they are; any other is double-quoted with C escapes, `%%` and `$$`. A NUL
    cannot be passed in argv at all and is refused.
    """
    if isinstance(word, Raw):
        return word.text
    if "\x00" in word:
        raise EngineError(f"{word!r}: a NUL byte cannot be part of a command line")
    if word and _PLAIN.match(word) and not word.startswith(("-@", "@")):
        return word
    return '"' + "".join(_escape_char(c, dollar=dollar) for c in word) + '"'


def systemd_command_line(argv: tuple[Word, ...] | list[Word]) -> str:
    """A whole command line for `ExecStart=` and friends; argv[0] is an absolute path we chose."""
    first = argv[0]
    if not isinstance(first, str) or not first.startswith("/") or not _PLAIN.match(first):
        raise EngineError(f"{first!r}: the executable of a unit must be a plain absolute path")
    return " ".join(systemd_word(w) for w in argv)


def systemd_assignment(key: str, value: str) -> str:
    """`KEY=value` for `Environment=` (quoted as one word; `$` has no meaning there)."""
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise EngineError(f"{key!r} is not an environment variable name")
    return systemd_word(f"{key}={value}", dollar=False)


def unit_text(value: str) -> str:
    """A free-text setting (`Description=`): one line, specifiers escaped, control characters spelt out."""
    return "".join("%%" if c == "%" else (c if c.isprintable() else f"\\x{ord(c):02x}") for c in value)


# --- paths -------------------------------------------------------------------------------------------


def _component(value: str, what: str) -> str:
    if not _COMPONENT.match(value) or value in {".", ".."}:
        raise EngineError(f"{what} {value!r} cannot name a directory of the model store")
    return value


def model_dir(service: InferenceService, root: str = MODEL_ROOT) -> str:
    """The model's directory on the node: `<root>/<name>/<revision>`, never anywhere else."""
    m = service.model
    path = posixpath.join(root, _component(m.name, "model name"), _component(m.revision, "revision"))
    if posixpath.normpath(path) != path or posixpath.commonpath([root, path]) != root:
        raise EngineError(f"model directory {path!r} is outside the model store {root}")
    return path


def model_file(service: InferenceService) -> str:
    """Path, inside the model directory, of a single-file model (a GGUF for llama.cpp); empty for a directory.

    An `http(s)://` source names its file by its last path segment; an `hf://org/name@rev/<file>` source
    by the file path in the repository (subdirectories kept, as the bundle and the node lay it out).
    """
    src = service.model.source
    hub = parse_hf_source(src)
    if hub is not None:
        parts = hub.path.split("/") if hub.path else []
        if any(not _FILE_NAME.match(p) or p in {".", ".."} for p in parts):
            raise EngineError(f"model file {hub.path!r} of {src!r} cannot be placed in the model store")
        return "/".join(parts)
    if not src.startswith(("http://", "https://")):
        return ""
    name = posixpath.basename(urlsplit(src).path)
    if not name:
        return ""
    if not _FILE_NAME.match(name):
        raise EngineError(f"model file name {name!r} of {src!r} cannot be placed in the model store")
    return name


def _llamacpp_file(service: InferenceService) -> str:
    """The GGUF llama.cpp loads: it serves one file, never a directory."""
    name = model_file(service)
    if not name:
        hint = "hf://<org>/<name>@<revision>/<file>.gguf" if parse_hf_source(service.model.source) else "its URL"
        raise EngineError(f"service {service.name!r}: llama.cpp serves one GGUF file; name it in source ({hint})")
    return name


def _image(service: InferenceService) -> str:
    image = service.image or ""
    if not _IMAGE.match(image):
        raise EngineError(f"service {service.name!r}: image {image!r} is not a plain reference by digest")
    return image


# --- engine arguments ----------------------------------------------------------------------------


def vllm_args(service: InferenceService, model: str = CONTAINER_MODEL_DIR, node: NodeRank | None = None) -> list[str]:
    """`vllm serve` arguments (after the image's `vllm serve` entrypoint): the model is positional.

    `node`: this node's rank in a service spanning nodes (TP inside each node, one pipeline stage per node).
    """
    if service.model.dtype not in _VLLM_DTYPE:
        raise EngineError(
            f"service {service.name!r}: vLLM has no generic {service.model.dtype.value} quantisation; "
            "serve an awq or gptq checkpoint instead"
        )
    flag, value = _VLLM_DTYPE[service.model.dtype]
    span: list[str] = []
    if node is not None:
        if service.pipeline_parallel != node.nnodes or not 0 <= node.rank < node.nnodes:
            raise EngineError(
                f"service {service.name!r}: vLLM runs one pipeline stage per node; pipeline_parallel "
                f"{service.pipeline_parallel} over {node.nnodes} nodes (rank {node.rank}) cannot be launched"
            )
        span = [
            "--distributed-executor-backend=mp",
            f"--nnodes={node.nnodes}",
            f"--node-rank={node.rank}",
            f"--master-addr={node.master_addr}",
            f"--master-port={node.master_port}",
        ]
        if node.rank > 0:
            span.append("--headless")  # GPU workers only; the head (rank 0) serves the API
    return [
        model,
        f"--served-model-name={service.model.name}",
        f"--max-model-len={service.model.context_length}",
        f"--max-num-seqs={service.max_concurrency}",
        f"--tensor-parallel-size={service.tensor_parallel}",
        f"--pipeline-parallel-size={service.pipeline_parallel}",
        f"--gpu-memory-utilization={service.gpu_memory_utilization}",
        f"{flag}={value}",
        f"--kv-cache-dtype={_VLLM_KV[service.kv_cache_dtype]}",
        "--host=0.0.0.0",
        f"--port={service.port}",
        *span,
    ]


def tgi_args(service: InferenceService, model: str = CONTAINER_MODEL_DIR) -> list[str]:
    """`text-generation-launcher` arguments (the TGI image's entrypoint)."""
    if service.pipeline_parallel != 1:
        raise EngineError(f"service {service.name!r}: TGI shards by tensor parallelism only (pipeline_parallel 1)")
    kv = service.kv_cache_dtype
    flag, value = _TGI_DTYPE[service.model.dtype]
    if kv not in (KvCacheDType.AUTO, *_TGI_KV) and not (flag == "--dtype" and _VLLM_KV[kv] == value):
        raise EngineError(
            f"service {service.name!r}: TGI keeps the KV cache in the model's dtype or fp8; "
            f"kv_cache_dtype {kv.value} is not one of them"
        )
    ctx = service.model.context_length
    out = [
        f"--model-id={model}",
        f"--num-shard={service.tensor_parallel}",
        f"--max-input-tokens={ctx - 1}",
        f"--max-total-tokens={ctx}",
        f"--max-concurrent-requests={service.max_concurrency}",
        f"--cuda-memory-fraction={service.gpu_memory_utilization}",
        f"{flag}={value}",
    ]
    if kv in _TGI_KV:
        out.append(f"--kv-cache-dtype={_TGI_KV[kv]}")
    return [*out, "--hostname=0.0.0.0", f"--port={service.port}", "--usage-stats=off"]


def llamacpp_server_args(service: InferenceService, model: str) -> list[str]:
    """`llama-server` arguments (the llama.cpp server image): the context is shared by the slots."""
    slots = service.max_concurrency
    return [
        f"--model={model}",
        f"--alias={service.model.name}",
        f"--ctx-size={service.model.context_length * slots}",
        f"--parallel={slots}",
        "--n-gpu-layers=999",
        "--host=0.0.0.0",
        f"--port={service.port}",
    ]


def llamacpp_native_args(service: InferenceService, model: str) -> list[str]:
    """`python -m llama_cpp.server` arguments (llama-cpp-python: one sequence at a time, queued)."""
    return [
        f"--model={model}",
        f"--model_alias={service.model.name}",
        "--host=0.0.0.0",
        f"--port={service.port}",
        f"--n_ctx={service.model.context_length}",
        "--n_gpu_layers=-1",
        # The server otherwise cuts off a streaming request whenever a new one arrives.
        "--interrupt_requests=False",
    ]


def engine_args(service: InferenceService, node: NodeRank | None = None) -> list[str]:
    """The engine's own arguments inside its container (or after the native server module)."""
    if service.engine is Engine.VLLM:
        return vllm_args(service, node=node)
    if service.engine is Engine.TGI:
        return tgi_args(service)
    if service.engine is Engine.LLAMACPP:
        if parse_hf_source(service.model.source):
            return llamacpp_server_args(service, posixpath.join(CONTAINER_MODEL_DIR, _llamacpp_file(service)))
        name = model_file(service)
        model = posixpath.join(CONTAINER_MODEL_DIR, name) if name else CONTAINER_MODEL_DIR
        return llamacpp_server_args(service, model)
    raise EngineError(f"engine {service.engine!r} is not offered")


# --- the unit ---------------------------------------------------------------------------------------


def _major(version: str) -> int:
    m = re.match(r"^(?:\d+:)?(\d+)", version)
    return int(m.group(1)) if m else 0


def gpu_options(runtime: ContainerEngine, runtime_version: str, gpus: str = "all") -> list[str]:
    """How the runtime hands the node's GPUs to a container, as that runtime documents it."""
    if runtime is ContainerEngine.PODMAN or (
        runtime is ContainerEngine.DOCKER and _major(runtime_version) >= DOCKER_CDI_MAJOR
    ):
        return [f"--device=nvidia.com/gpu={gpus}"]  # CDI name, from the spec nvidia-ctk generates
    if runtime is ContainerEngine.DOCKER:
        return ["--runtime=nvidia", f"--gpus={gpus}"]
    raise EngineError(f"{runtime.value} cannot run inference containers with GPUs")


def container_run(
    service: InferenceService,
    runtime: ContainerEngine,
    runtime_version: str,
    *,
    host_model_dir: str,
    node: NodeRank | None = None,
) -> list[Word]:
    """The runtime's `run` command of a container service, engine arguments included."""
    if runtime not in RUNTIME_BIN:
        raise EngineError(
            f"service {service.name!r}: {runtime.value} has no service runner with CDI GPU access here "
            "(ctr is a debug client); use podman or docker"
        )
    image = _image(service)
    opts: list[Word] = [RUNTIME_BIN[runtime], "run", "--rm"]
    if runtime is ContainerEngine.PODMAN:
        # No --cgroups here: podman's containers.conf decides, which the container_runtime role writes
        # from the host's declared capabilities (a host without its own cgroup tree disables them).
        opts += ["--replace", "--security-opt=label=disable"]
    opts += ["--name", Raw("%N"), "--network=host", *gpu_options(runtime, runtime_version)]
    if service.engine is Engine.VLLM and service.tensor_parallel * service.pipeline_parallel > 1:
        opts.append("--ipc=host")  # NCCL between the workers needs shared memory (vLLM's docker docs)
    elif service.engine is Engine.TGI:
        opts.append("--shm-size=1g")  # TGI's docker docs: shards share memory through /dev/shm
    opts.append(f"--volume={host_model_dir}:{CONTAINER_MODEL_DIR}:ro")
    opts += [f"--env={k}={v}" for k, v in sorted(OFFLINE_ENV.items())]
    if service.engine is Engine.TGI:
        opts.append("--env=USAGE_STATS=off")
    if node is not None:
        # The address this node's vLLM processes announce to the group (vllm/envs.py VLLM_HOST_IP).
        opts.append(f"--env=VLLM_HOST_IP={node.host_ip}")
    return [*opts, image, *engine_args(service, node)]


def rpc_worker_commands(
    service: InferenceService, bind: str, *, venv_root: str = VENV_ROOT, user: str = "gpufleet-inference"
) -> UnitCommands:
    """The unit of a worker of a llama.cpp service spanning nodes: its RPC backend on the fabric address."""
    if not _COMPONENT.match(service.name):
        raise EngineError(f"service name {service.name!r} cannot name a venv directory")
    python = posixpath.join(venv_root, service.name, "venv", "bin", "python")
    argv: list[Word] = [python, RPC_PROGRAM, "worker", f"--host={bind}", f"--port={service.rpc_port}"]
    return UnitCommands(exec_start=tuple(argv), environment=dict(OFFLINE_ENV), user=user)


def unit_commands(
    service: InferenceService,
    runtime: ContainerEngine,
    runtime_version: str,
    *,
    model_root: str = MODEL_ROOT,
    venv_root: str = VENV_ROOT,
    user: str = "gpufleet-inference",
    rpc_servers: Sequence[str] = (),
    node: NodeRank | None = None,
) -> UnitCommands:
    """Every command of one service's unit, computed from the plan.

    `rpc_servers`: a spanning llama.cpp head's workers; `node`: this node's rank in a spanning vLLM service.
    """
    directory = model_dir(service, model_root)
    if service.engine is Engine.LLAMACPP and service.image is None:
        name = _llamacpp_file(service)
        python = posixpath.join(venv_root, service.name, "venv", "bin", "python")
        if not _COMPONENT.match(service.name):
            raise EngineError(f"service name {service.name!r} cannot name a venv directory")
        server = llamacpp_native_args(service, f"{directory}/{name}")
        # A spanning service's head: llama-cpp-python ignores its own `rpc_servers` setting (0.3.36), so the
        # program registers the workers as ggml devices, then runs the same server with the same arguments.
        argv: list[Word] = (
            [python, RPC_PROGRAM, "head", f"--rpc={','.join(rpc_servers)}", "--", *server]
            if rpc_servers
            else [python, "-m", "llama_cpp.server", *server]
        )
        return UnitCommands(exec_start=tuple(argv), environment=dict(OFFLINE_ENV), user=user)
    run = container_run(service, runtime, runtime_version, host_model_dir=directory, node=node)
    binary = RUNTIME_BIN[runtime]
    if runtime is ContainerEngine.PODMAN:
        return UnitCommands(exec_start=tuple(run), exec_stop=((binary, "stop", "--ignore", "--time=30", Raw("%N")),))
    # `docker run --rm` leaves a container behind if the daemon died; `-` ignores "no such container".
    pre = (binary, "rm", "--force", Raw("%N"))
    stop = (binary, "stop", "--time=30", Raw("%N"))
    return UnitCommands(exec_start=tuple(run), exec_start_pre=(pre,), exec_stop=(stop,))
