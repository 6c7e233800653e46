"""llama.cpp as a benchmark peer: a model folder written as GGUF, and timed runs on token ids.

The GGUF writer uses the ``gguf`` package (a core dependency), so a folder converts anywhere;
running it needs the optional ``llama-cpp-python`` (``pip install 'sdsprune[llamacpp]'``),
imported only when a runner is made. The runner takes token ids, not text, so it is timed on
exactly the ids the torch backends get, and its greedy tokens compare with theirs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsprune.errors import SdspruneError

INSTALL_HINT = (
    "pip install 'sdsprune[llamacpp]', builds llama.cpp from source: about 10 minutes on 2 cores"
)


@dataclass(frozen=True)
class _Precision:
    file_type: Any  # gguf.LlamaFileType
    matrix_type: Any  # gguf.GGMLQuantizationType for 2-D weights


@dataclass(frozen=True)
class _Arch:
    gguf_arch: Any  # gguf.MODEL_ARCH
    # llama.cpp's LLAMA graph rotates interleaved pairs (x0, x1), (x2, x3), ...; HF Llama
    # rotates halves (x_i, x_{i+d/2}). QWEN2's graph rotates halves, as HF does.
    permute_qk: bool


def _precisions() -> dict[str, _Precision]:
    import gguf

    return {
        "f32": _Precision(gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "bf16": _Precision(gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
        "q8_0": _Precision(gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }


def _architectures() -> dict[str, _Arch]:
    import gguf

    return {
        "llama": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        # Mistral is llama's graph; llama.cpp attends to the whole context (no sliding window)
        "mistral": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        "qwen2": _Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    }


def write_gguf(folder: Path, path: Path, precision: str) -> Path:
    """Write the model in ``folder`` (dense or sparse export) as a GGUF file at ``path``.

    ``precision`` (f32, bf16, q8_0) applies to 2-D weights; norms and biases stay f32, and a
    q8_0 weight whose rows are not a multiple of 32 stays f32. The file is written next to
    ``path`` under a temporary name and renamed, so an interrupted write leaves no partial
    GGUF for llama.cpp to trip on.
    """
    from sdsprune.inference.loader import load

    folder, path = Path(folder), Path(path)
    if precision not in _precisions():
        raise SdspruneError(f"GGUF precision {precision!r}: choose one of {sorted(_precisions())}")
    config = _config(folder)
    arch = _arch(config)
    vocab = _vocabulary(folder, config.vocab_size)
    model = load(folder, backend="dense", decode="eager").model
    tensors = {name: t.detach().float() for name, t in model.state_dict().items()}
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        _write(Path(temp), config, arch, vocab, tensors, _precisions()[precision])
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise SdspruneError(f"cannot read {folder}/config.json: {exc}") from exc


def _arch(config) -> _Arch:
    """The GGUF architecture for ``config``, or an error saying why there is none."""
    model_type = getattr(config, "model_type", None)
    arch = _architectures().get(model_type)
    if arch is None:
        raise SdspruneError(
            f"llama.cpp export supports model types {sorted(_architectures())}, not {model_type!r}"
        )
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type != "default":
        raise SdspruneError(f"llama.cpp export supports plain RoPE only, not {rope_type!r} scaling")
    return arch


def _rope(config) -> dict:
    """RoPE settings: ``rope_parameters`` in transformers 5, ``rope_theta``/``rope_scaling``
    before."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    types: list[int]
    special: Any  # gguf.SpecialVocab: merges and bos/eos ids


def _vocabulary(folder: Path, size: int) -> _Vocabulary:
    """The folder's BPE vocabulary padded to the embedding's ``size`` rows (llama.cpp refuses
    a GGUF whose token list is not exactly that long)."""
    import gguf

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SdspruneError(f"{folder} has no tokenizer.json; llama.cpp needs the vocabulary")
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise SdspruneError(
            f"llama.cpp export needs a BPE tokenizer.json, not {model.get('type')!r}"
        )
    by_id: dict[int, tuple[str, int]] = {
        index: (token, gguf.TokenType.NORMAL) for token, index in model["vocab"].items()
    }
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= size:
        raise SdspruneError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {size}")
    entries = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(size)]
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    if not special.merges:
        raise SdspruneError(
            f"{tokenizer_file} has no BPE merges; llama.cpp refuses a BPE vocab without them"
        )
    return _Vocabulary([t for t, _ in entries], [int(k) for _, k in entries], special)


def _write(
    temp: Path,
    config,
    arch: _Arch,
    vocab: _Vocabulary,
    tensors: dict[str, torch.Tensor],
    precision: _Precision,
) -> None:
    import gguf

    writer = gguf.GGUFWriter(temp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    _add_hyperparameters(writer, config, precision)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    for hf_name, tensor in tensors.items():
        if hf_name == "lm_head.weight" and _tied(config):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SdspruneError(f"no GGUF name for tensor {hf_name!r}")
        array = _rope_layout(hf_name, tensor, config, arch).numpy()
        data, qtype = _encode(array, precision.matrix_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, config, precision: _Precision) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(precision.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _rope_layout(hf_name: str, tensor: torch.Tensor, config, arch: _Arch) -> torch.Tensor:
    """Q and K rows (and biases) reordered per head from rotate-half order to llama.cpp's
    interleaved pairs: row ``2i`` is HF row ``i``, row ``2i+1`` is HF row ``i + d/2``."""
    if not arch.permute_qk:
        return tensor
    if ".self_attn.q_proj." in hf_name:
        heads = config.num_attention_heads
    elif ".self_attn.k_proj." in hf_name:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return tensor
    rest = tensor.shape[1:]
    halves = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *rest)
    return halves.transpose(1, 2).reshape(tensor.shape).contiguous()


def _encode(array: np.ndarray, matrix_type) -> tuple[np.ndarray, Any]:
    """``array`` in the GGUF type it is stored as: 1-D tensors and q8_0 misfits as f32."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    if array.ndim < 2 or matrix_type == f32:
        return array, f32
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if array.shape[-1] % block != 0:
        return array, f32
    return gguf.quants.quantize(array, matrix_type), matrix_type


def llamacpp_problem() -> str | None:
    """Why llama.cpp cannot run here (one line), or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    except OSError as exc:  # the package is there but its shared library does not load
        return f"llama-cpp-python cannot load llama.cpp: {str(exc).splitlines()[0]}"
    return None


class LlamaCppRunner:
    """A GGUF model in llama.cpp, run on token ids: prefill and decode timings, greedy tokens.

    Greedy choices use the last position's logits only (``logits_all=False``), as the torch
    decode does with ``logits_to_keep=1``. The KV cache is llama.cpp's default f16, so even an
    f32 GGUF's logits differ from torch's float32 ones by about 1e-3 (its usual configuration
    is what gets timed).
    """

    def __init__(self, gguf_path: Path, threads: int, context: int) -> None:
        problem = llamacpp_problem()
        if problem is not None:
            raise SdspruneError(problem)
        from llama_cpp import Llama

        self.context = context
        # n_batch = context: any prompt that fits is one llama_decode call, as torch's
        # prefill is one forward
        self._llama = Llama(
            model_path=str(gguf_path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=context,
            n_batch=context,
            logits_all=False,
            verbose=False,
        )

    def prefill_seconds(self, ids: list[int]) -> float:
        """Wall seconds to evaluate the prompt ``ids`` from an empty cache."""
        self._check_fits(ids, 0)
        self._llama.reset()
        start = time.perf_counter()
        self._llama.eval(ids)
        return time.perf_counter() - start

    def decode_seconds(self, ids: list[int], steps: int) -> float:
        """Mean wall seconds per greedy step (choose the argmax token, evaluate it) after the
        untimed prompt ``ids``."""
        self._check_fits(ids, steps)
        self._llama.reset()
        self._llama.eval(ids)
        start = time.perf_counter()
        for _ in range(steps):
            self._llama.eval([self._argmax()])
        return (time.perf_counter() - start) / steps

    def greedy_tokens(self, ids: list[int], steps: int) -> list[int]:
        """The ``steps`` greedy tokens after ``ids``: the prompt's choice first, as the torch
        greedy decode lists them."""
        self._check_fits(ids, steps)
        self._llama.reset()
        self._llama.eval(ids)
        chosen = [self._argmax()]
        while len(chosen) < steps:
            self._llama.eval([chosen[-1]])
            chosen.append(self._argmax())
        return chosen

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """The logits at the last position of ``ids`` (a copy), to compare with torch's."""
        self._check_fits(ids, 0)
        self._llama.reset()
        self._llama.eval(ids)
        return self._logits().copy()

    def close(self) -> None:
        """Free llama.cpp's model and context now: freed at interpreter exit instead,
        llama-cpp-python prints a traceback."""
        self._llama.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._llama.n_vocab(),))

    def _argmax(self) -> int:
        return int(self._logits().argmax())

    def _check_fits(self, ids: list[int], steps: int) -> None:
        if not ids:
            raise SdspruneError("llama.cpp needs at least one prompt token")
        if len(ids) + steps > self.context:
            raise SdspruneError(
                f"{len(ids)} prompt tokens + {steps} steps exceed the llama.cpp context of "
                f"{self.context}"
            )
