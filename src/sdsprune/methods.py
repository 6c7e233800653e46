"""Every pruning method as one typed config: the single source of its settings' defaults.

A config names its method and holds its settings; the composite methods hold other configs::

    SparseGPT()                       Wanda()          DSnoT(initial="sparsegpt")
    SDS(base=Wanda(), block_epochs=1) OWL(inner=SDS(base=SparseGPT()), lam=0.05)

The same config is what :func:`sdsprune.prune` runs, what ``sdsprune prune``'s flags are
generated from (:mod:`sdsprune.cli_flags`), what a method string parses into and what a
report stores. A method string names a pruner with its options in brackets, SDS with its
base after a colon and OWL as a suffix, options separated by ``;`` (so that strings fit in
comma-separated lists)::

    dsnot[initial=sparsegpt;max_cycles=100]    sds:wanda    sds[schedule=staged]:sparsegpt+owl[lam=0.05]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

from sdsprune.engine.memory_plan import MethodTerms
from sdsprune.errors import SdspruneError
from sdsprune.owl import OWLConfig
from sdsprune.pruners import (
    ADMMPruner,
    DSnoTPruner,
    MagnitudePruner,
    Pruner,
    PrunerZeroPruner,
    SparseGPTPruner,
    WandaPruner,
)
from sdsprune.sds.config import SDSConfig
from sdsprune.settings import (
    format_options,
    nested,
    parse_options,
    setting,
    settings_of,
)

OPTION_SEPARATOR = ";"
OWL_SUFFIX = "+owl"


@dataclass(frozen=True)
class BaseMethod:
    """A one-shot pruner's settings (a subclass's fields are its constructor's arguments)."""

    pruner_class: ClassVar[type[Pruner]]
    name: ClassVar[str]  # the pruner's name
    flag_prefix: ClassVar[str]  # its settings' flags are --<name>-<setting>

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.pruner_class.name
        cls.flag_prefix = f"{cls.name}-"

    def __post_init__(self) -> None:
        self.pruner()  # a value the pruner refuses is refused when the config is made

    def pruner(self) -> Pruner:
        try:
            return self.pruner_class(**settings_of(self))
        except ValueError as exc:  # the constructor's own check of a value
            raise SdspruneError(f"pruner '{format_method(self)}': {exc}") from None

    def for_run(self, low_memory: bool, windows: int) -> BaseMethod:
        """Itself: a pruner's defaults do not depend on the run."""
        return self

    def plan_terms(self) -> MethodTerms:
        """What the memory plan counts for it: its statistics, and no solver of its own."""
        return MethodTerms(statistics=self.pruner().needs)


@dataclass(frozen=True)
class Magnitude(BaseMethod):
    """|W|, compared within each layer."""

    pruner_class: ClassVar[type[Pruner]] = MagnitudePruner


@dataclass(frozen=True)
class Wanda(BaseMethod):
    """|W| x input feature norm, compared within each output row."""

    pruner_class: ClassVar[type[Pruner]] = WandaPruner


@dataclass(frozen=True)
class SparseGPT(BaseMethod):
    """OBS-style pruning with second-order updates of the remaining weights."""

    pruner_class: ClassVar[type[Pruner]] = SparseGPTPruner
    blocksize: int = setting(128, "SparseGPT: columns a lazy-update block prunes at once.")
    percdamp: float = setting(0.01, "SparseGPT: Hessian dampening, x the mean of its diagonal.")

    def plan_terms(self) -> MethodTerms:
        """The Gram matrix, factorised once per input, and one update product per layer."""
        return MethodTerms(factors_hessian=True, factorisations=1, layer_products=1)


@dataclass(frozen=True)
class ADMM(BaseMethod):
    """ADMM weight update with a gradually growing mask; defaults are the published code's."""

    pruner_class: ClassVar[type[Pruner]] = ADMMPruner
    iterations: int = setting(20, "ADMM iterations.")
    growth_iterations: int = setting(15, "ADMM: the mask grows over the first N iterations.")
    rho: float = setting(1.0, "ADMM penalty weight ρ.")
    percdamp: float = setting(0.1, "ADMM dampening, x mean(diag G) in the normalised basis.")


@dataclass(frozen=True)
class DSnoT(BaseMethod):
    """Training-free prune-and-grow mask refinement; defaults are the published code's."""

    pruner_class: ClassVar[type[Pruner]] = DSnoTPruner
    initial: str = setting("wanda", "DSnoT initial mask: wanda, sparsegpt or magnitude.")
    max_cycles: int = setting(50, "DSnoT: at most N prune-and-grow swaps per row.")
    update_threshold: float = setting(0.1, "DSnoT: a row swaps while |its output shift| > this.")
    variance_power: float = setting(
        1.0, "DSnoT: the regrowing score is divided by the input variance to this power."
    )


@dataclass(frozen=True)
class PrunerZero(BaseMethod):
    """Pruner-Zero's symbolic metric |W|² x scaled input norm, compared within output rows."""

    pruner_class: ClassVar[type[Pruner]] = PrunerZeroPruner


@dataclass(frozen=True)
class SDS(SDSConfig):
    """Sparse-Dense-Sparse: a base pruner, then re-dense, re-prune and adjust (the settings
    are :class:`sdsprune.sds.SDSConfig`'s)."""

    name: ClassVar[str] = "sds"
    flag_prefix: ClassVar[str] = ""  # SDS's flags keep their names: --schedule, --mu, ...
    base: BaseMethod = field(
        default_factory=SparseGPT,
        kw_only=True,
        metadata=nested("Base pruner of SDS: any --method except sds.", flag="base"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, BaseMethod):
            raise SdspruneError(f"the base of SDS must be a one-shot pruner (got {self.base!r})")

    def plan_terms(self) -> MethodTerms:
        """Its base's solver, the re-dense's, Grams (the dense model's too for dd/kd), the
        dense stream, the block re-fit, the staged schedule's passes and copies, and the
        distillation stage."""
        return MethodTerms(
            statistics="gram",
            factors_hessian=self.base.plan_terms().factors_hessian,
            redense="factored" if self.solver == "closed" else "iterative",
            factorisations=3,  # the Hessian twice (two base prunings), the re-dense once
            # products: two base prunings, the re-dense target and solve, the stage errors,
            # and one per adjustment step
            layer_products=2 + 2 + 1 + self.adjust_iters,
            dense_stream=self.dense_stream,
            dense_statistics=self.dense_statistics,
            block_epochs=self.block_epochs,
            block_windows=self.block_windows,
            block_batch=self.block_batch,
            staged=self.schedule == "staged",
            distill_epochs=self.distill_epochs or 0,  # None: decided by for_run
        )


@dataclass(frozen=True)
class OWL(OWLConfig):
    """OWL's per-block sparsities around any other method (the settings are
    :class:`sdsprune.owl.OWLConfig`'s)."""

    name: ClassVar[str] = "owl"
    flag_prefix: ClassVar[str] = "owl-"
    summary: ClassVar[str] = (
        "OWL: a sparsity per block from its outlier ratio, the total unchanged "
        "(unstructured sparsity only)."
    )
    inner: BaseMethod | SDS = field(
        default_factory=SparseGPT, kw_only=True, metadata=nested("The method OWL runs per block.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.inner, BaseMethod | SDS):
            raise SdspruneError(f"OWL runs a pruner or SDS (got {self.inner!r})")

    def for_run(self, low_memory: bool, windows: int) -> OWL:
        """Its method's run-dependent defaults decided (see :meth:`SDSConfig.for_run`)."""
        return replace(self, inner=self.inner.for_run(low_memory, windows))

    def plan_terms(self) -> MethodTerms:
        """Its method's (the statistics pass runs before, with the method's memory free)."""
        return self.inner.plan_terms()


Method = BaseMethod | SDS | OWL
BASE_METHODS: dict[str, type[BaseMethod]] = {
    cls.pruner_class.name: cls for cls in (Magnitude, Wanda, SparseGPT, ADMM, DSnoT, PrunerZero)
}
CONFIG_CLASSES: tuple[type, ...] = (*BASE_METHODS.values(), SDS, OWL)
Presets = Mapping[str, Mapping[str, object]]  # method name -> settings given elsewhere

_TERM = r"[\w-]+(?:\[[^\]]*\])?"
_SPEC = re.compile(rf"^(?P<head>{_TERM})(?::(?P<base>{_TERM}))?(?:\+(?P<wrapper>{_TERM}))?$")
_NAMED = re.compile(r"^(?P<name>[\w-]+)(?:\[(?P<options>[^\]]*)\])?$")


def method_choices() -> str:
    """The method strings, for help texts and errors."""
    return ", ".join([*BASE_METHODS, f"{SDS.name}:<base>", f"<method>{OWL_SUFFIX}"])


# ----------------------------------------------------------------------------- parsing
def as_method(method: Method | str) -> Method:
    """A config as given, or parsed from a method string (``"sparsegpt"``, ``"sds:wanda"``)."""
    return parse_method(method) if isinstance(method, str) else method


def parse_method(text: str, presets: Presets | None = None) -> Method:
    """The config a method string names. ``presets`` (per method name: settings that came
    from elsewhere, such as flags) fill in what the string leaves out; the string wins."""
    presets = presets or {}
    match = _SPEC.match(text.strip().replace(" ", ""))
    if match is None:
        raise _unknown(text)
    name, options = _named(match["head"], text)
    if name == SDS.name:
        method = _sds(options, match["base"], text, presets)
    elif match["base"] is not None:
        raise _unknown(text)
    else:
        method = _base(name, options, text, presets)
    if match["wrapper"] is None:
        return method
    wrapper, options = _named(match["wrapper"], text)
    if wrapper != OWL.name:
        raise _unknown(text)
    return _build(OWL, options, presets, inner=method)


def _unknown(text: str) -> SdspruneError:
    return SdspruneError(f"unknown method '{text}' (choose from {method_choices()})")


def _named(term: str, text: str) -> tuple[str, str]:
    match = _NAMED.match(term)
    if match is None:
        raise _unknown(text)
    return match["name"], match["options"] or ""


def _sds(options: str, base: str | None, text: str, presets: Presets) -> SDS:
    if base is None:
        return _build(SDS, options, presets)
    name, base_options = _named(base, text)
    if name not in BASE_METHODS:
        choices = ", ".join(f"{SDS.name}:{known}" for known in BASE_METHODS)
        raise SdspruneError(f"unknown SDS base '{base}' in '{text}' (use {choices})")
    return _build(SDS, options, presets, base=_base(name, base_options, text, presets))


def _base(name: str, options: str, text: str, presets: Presets) -> BaseMethod:
    if name not in BASE_METHODS:
        raise _unknown(text)
    return _build(BASE_METHODS[name], options, presets)


def _build(cls: type, options: str, presets: Presets, **inner: object) -> Method:
    """``cls`` from its presets, then the string's options (and nested configs)."""
    given = parse_options(cls, cls.name, options, OPTION_SEPARATOR) if options else {}
    return cls(**{**presets.get(cls.name, {}), **given, **inner})


# ----------------------------------------------------------------------------- text
def format_method(method: Method, presets: Presets | None = None) -> str:
    """The method string that :func:`parse_method` (with the same ``presets``) reads back
    into ``method``: only settings that differ from what the presets alone give appear."""
    presets = presets or {}
    if isinstance(method, OWL):
        return format_method(method.inner, presets) + OWL_SUFFIX + _options(method, presets)
    if isinstance(method, SDS):
        return f"{SDS.name}{_options(method, presets)}:{format_method(method.base, presets)}"
    return method.name + _options(method, presets)


def _options(method: Method, presets: Presets) -> str:
    reference = settings_of(type(method)(**presets.get(method.name, {})))
    changed = {k: v for k, v in settings_of(method).items() if reference[k] != v}
    return f"[{format_options(changed, OPTION_SEPARATOR)}]" if changed else ""


def changed_settings(config: object) -> dict[str, object]:
    """The settings of ``config`` that differ from its class's defaults (as presets)."""
    defaults = settings_of(type(config)())
    return {k: v for k, v in settings_of(config).items() if defaults[k] != v}


def parse_settings(cls: type, text: str) -> dict[str, object]:
    """Settings of ``cls`` from ``"key=value,key=value"`` (``compare --sds``): the commands
    that run several methods take one method's settings through one option."""
    return parse_options(cls, cls.name, text, ",")


# ----------------------------------------------------------------------------- reports
def report_settings(method: Method) -> dict[str, object]:
    """How a report stores the method: ``method`` (a pruner's string, or ``sds``), ``base``
    (SDS's pruner, else None) and, where used, every SDS and OWL setting spelled out."""
    inner = method.inner if isinstance(method, OWL) else method
    if isinstance(inner, SDS):
        stored = {"method": SDS.name, "base": format_method(inner.base)}
        stored[SDS.name] = settings_of(inner)
    else:
        stored = {"method": format_method(inner), "base": None}
    if isinstance(method, OWL):
        stored[OWL.name] = settings_of(method)
    return stored


def method_from_report(stored: Mapping[str, object]) -> Method:
    """The config a report's settings describe (:func:`report_settings` read back)."""
    if stored["method"] == SDS.name:
        base = parse_method(str(stored["base"]))
        method = SDS(**stored.get(SDS.name, {}), base=base)
    else:
        method = parse_method(str(stored["method"]))
    if stored.get(OWL.name) is not None:
        return OWL(**stored[OWL.name], inner=method)
    return method
