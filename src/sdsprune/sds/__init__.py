"""SDS: prune, re-densify under sparsity-promoting regularization, prune again, adjust."""

from sdsprune.sds.config import SDSConfig
from sdsprune.sds.pipeline import run_sds
from sdsprune.sds.solver import adjust, redense

__all__ = ["SDSConfig", "adjust", "redense", "run_sds"]
