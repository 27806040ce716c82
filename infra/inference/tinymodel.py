"""The lab's tiny random-weight GGUF model (`gpufleet-tiny-lab`): generated here, never downloaded.

A llama-architecture model that llama.cpp loads and answers completions with, sized to the catalogue
entry (2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 256, ≈2.2 M parameters). The tokenizer is a
minimal SentencePiece ("llama") vocabulary: `<unk>`, `<s>`, `</s>` and byte tokens `<0x03>`…`<0xFF>`
(id = byte value), so any prompt text tokenizes through byte fallback.

The weights are seeded random normals, so the bytes are identical on every machine that runs the same
gguf/numpy versions (the lock file records the hash). One trick makes the output usable for a
benchmark: the output rows of control and non-ASCII tokens are zero while printable rows are large, so
sampling picks printable ASCII and practically never `</s>` — every request generates its full
`max_tokens`, and streamed chunks are valid UTF-8 text.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "gpufleet-tiny-lab"
MODEL_REVISION = "lab-1"
SEED = 20261123
MODEL_CACHE = Path(os.environ.get("GPUFLEET_MODEL_CACHE", "/var/cache/gpufleet/models"))


@dataclass(frozen=True)
class TinyShape:
    """Architecture of the tiny model; must equal the catalogue entry (a unit test checks)."""

    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 256
    # Chosen so the parameter count matches the catalogue's 2.2e6 (hidden 64 alone would give 0.1 M).
    ffn: int = 5632
    context: int = 2048

    @property
    def hidden(self) -> int:
        """Embedding width (heads × head_dim)."""
        return self.heads * self.head_dim


SHAPE = TinyShape()
_UNK, _BOS, _EOS = 0, 1, 2
# gguf token types (llama.cpp `llama_token_type`): NORMAL 1, UNKNOWN 2, CONTROL 3, BYTE 6.
_TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_BYTE = 2, 3, 6


def vocabulary(vocab: int = SHAPE.vocab) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the byte-level SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(3, vocab)]
    types = [_TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_CONTROL] + [_TYPE_BYTE] * (vocab - 3)
    return tokens, [0.0] * vocab, types


def _printable(vocab: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    ids = np.arange(vocab)
    return (ids >= 0x20) & (ids < 0x7F)


def tensors(shape: TinyShape = SHAPE, seed: int = SEED) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    """(name, array) of every tensor in llama.cpp's llama layout, seeded; numpy shapes are (out, in)."""
    rng = np.random.default_rng(seed)
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim

    def mat(rows: int, cols: int) -> np.ndarray[Any, Any]:
        # 1/sqrt(fan_in) keeps activations O(1) through the layers.
        out: np.ndarray[Any, Any] = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)
        return out

    def norm() -> np.ndarray[Any, Any]:
        # Norm weights stay float32, as llama.cpp's converters write them.
        return np.ones(h, dtype=np.float32)

    yield "token_embd.weight", (rng.standard_normal((shape.vocab, h))).astype(np.float16)
    for i in range(shape.layers):
        yield f"blk.{i}.attn_norm.weight", norm()
        yield f"blk.{i}.attn_q.weight", mat(h, h)
        yield f"blk.{i}.attn_k.weight", mat(kv, h)
        yield f"blk.{i}.attn_v.weight", mat(kv, h)
        yield f"blk.{i}.attn_output.weight", mat(h, h)
        yield f"blk.{i}.ffn_norm.weight", norm()
        yield f"blk.{i}.ffn_gate.weight", mat(shape.ffn, h)
        yield f"blk.{i}.ffn_up.weight", mat(shape.ffn, h)
        yield f"blk.{i}.ffn_down.weight", mat(h, shape.ffn)
    yield "output_norm.weight", norm()
    out = rng.standard_normal((shape.vocab, h)) * 0.6
    out[~_printable(shape.vocab)] = 0.0
    yield "output.weight", out.astype(np.float16)


def parameter_count(shape: TinyShape = SHAPE) -> int:
    """Number of weights in the model (what the catalogue's `parameters` states)."""
    return sum(int(a.size) for _, a in tensors(shape))


def write_tiny_model(path: Path, shape: TinyShape = SHAPE, seed: int = SEED) -> Path:
    """Write the GGUF file to `path` (atomically: temp file, then rename)."""
    import gguf  # the `lab` extra; imported here so the CLI works without it

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = vocabulary(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(_UNK)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in tensors(shape, seed):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


def tiny_model_path(cache: Path | None = None) -> Path:
    """Where the model lives in the cache (same layout as the lab file stores: models/NAME/REV/)."""
    return (cache or MODEL_CACHE) / MODEL_NAME / MODEL_REVISION / "model.gguf"


def ensure_tiny_model(cache: Path | None = None) -> Path:
    """Path of the tiny GGUF model under /var/cache/gpufleet/models/, generated once (seeded)."""
    target = tiny_model_path(cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            write_tiny_model(target)
    return target
