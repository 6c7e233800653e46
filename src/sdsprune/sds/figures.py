"""The weight-distribution figure of one layer through the SDS stages."""

from __future__ import annotations

import torch

_TITLES = {
    "dense": "dense",
    "first_prune": "after first pruning",
    "redense": "after re-dense",
    "final": "final (second pruning, adjustment, block re-fit)",
}


class StageRecorder:
    """Keeps the chosen layer's weights at each stage (the paper's Figure: Gaussian, bimodal,
    three-peaked, sparse)."""

    def __init__(self, layer: str):
        self.layer = layer
        self.weights: dict[str, torch.Tensor] = {}

    def offer(self, name: str, stage: str, dense: torch.Tensor, weight: torch.Tensor) -> None:
        if name != self.layer:
            return
        self.weights.setdefault("dense", dense.detach().cpu().clone())
        self.weights[stage] = weight.detach().cpu().clone()

    def figures(self) -> dict[str, bytes]:
        """Rendered PNGs by file name (rendered now, so no open figure outlives the run)."""
        if not self.weights:
            return {}
        return {
            "weight_distribution.png": render_png(
                weight_distribution_figure(self.layer, self.weights)
            )
        }


def weight_distribution_figure(layer: str, weights: dict[str, torch.Tensor]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [stage for stage in _TITLES if stage in weights]
    dense = weights["dense"]
    limit = float(dense.abs().max())
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), sharex=True)
    for ax, stage in zip(axes, stages, strict=True):
        values = weights[stage].flatten().float()
        zeros = float((values == 0).float().mean())
        ax.hist(
            values.clamp(-limit, limit).numpy(), bins=121, range=(-limit, limit), color="#3a6ea5"
        )
        ax.set_yscale("log")
        ax.set_title(f"{_TITLES[stage]}\n{zeros:.0%} zeros", fontsize=10)
        ax.set_xlabel("weight value")
    axes[0].set_ylabel("count (log)")
    fig.suptitle(f"Weight distribution of layer {layer} through SDS", fontsize=11)
    fig.tight_layout()
    return fig


def render_png(figure) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
