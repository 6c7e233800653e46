"""``prune()``'s keyword arguments from before the typed options, mapped onto them.

Scripts written against the flat form (``prune(model, method="sds", base="wanda",
sds=SDSConfig(...), nsamples=64, device="cpu")``) keep working: each keyword they give is
moved into the method's config, the :class:`Calibration` or the :class:`RunOptions`, and
nothing else is defaulted here.
"""

from __future__ import annotations

import warnings
from dataclasses import fields, replace

from sdsprune.errors import SdspruneError
from sdsprune.methods import OWL, SDS, BaseMethod, Method, as_method, format_method
from sdsprune.options import Calibration, RunOptions
from sdsprune.settings import settings_of

CALIBRATION = {"calib": "corpus", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}
METHOD = ("base", "sds", "owl")


def apply_keywords(
    method: Method, calibration: Calibration, run: RunOptions, keywords: dict[str, object]
) -> tuple[Method, Calibration, RunOptions]:
    """``method``, ``calibration`` and ``run`` with the flat keywords moved into them."""
    run_fields = {item.name for item in fields(RunOptions)}
    unknown = sorted(set(keywords) - set(CALIBRATION) - set(METHOD) - run_fields)
    if unknown:
        raise TypeError(f"prune() got an unexpected keyword argument '{unknown[0]}'")
    warnings.warn(
        "prune()'s flat keywords are deprecated: pass a method config (sdsprune.methods), "
        "calibration=Calibration(...) and run=RunOptions(...)",
        DeprecationWarning,
        stacklevel=3,
    )
    calibration = replace(
        calibration, **{CALIBRATION[k]: v for k, v in keywords.items() if k in CALIBRATION}
    )
    run = replace(run, **{k: v for k, v in keywords.items() if k in run_fields})
    return _method(method, keywords), calibration, run


def _method(method: Method, keywords: dict[str, object]) -> Method:
    """``base`` and ``sds`` (an SDSConfig) complete an SDS method; ``owl`` (an OWLConfig)
    wraps the method in OWL."""
    base, sds, owl = (keywords.get(name) for name in METHOD)
    if isinstance(method, SDS):
        chosen = as_method(base) if base is not None else method.base
        if not isinstance(chosen, BaseMethod):
            raise SdspruneError(f"the base of SDS must be a one-shot pruner (got '{base}')")
        method = SDS(**settings_of(sds if sds is not None else method), base=chosen)
    elif base is not None and as_method(base) != SDS().base:
        raise SdspruneError(
            f"--base applies to --method sds only (got --method {format_method(method)})"
        )
    return OWL(**settings_of(owl), inner=method) if owl is not None else method
