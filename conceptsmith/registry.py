"""Plugin registry: editors, metrics, inference-time hooks and attacks, by name.

Built-in plugins register when their module is imported (``load_builtin_plugins``); third-party
packages expose theirs through the entry-point groups ``conceptsmith.editors``,
``conceptsmith.metrics`` and ``conceptsmith.attacks`` (the entry point names a module or an object;
loading it registers).
"""

from __future__ import annotations

import abc
import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from conceptsmith.edits import Edit

EDITOR_GROUP = "conceptsmith.editors"
METRIC_GROUP = "conceptsmith.metrics"
ATTACK_GROUP = "conceptsmith.attacks"
BUILTIN_PACKAGES: tuple[str, ...] = ("conceptsmith.erasure", "conceptsmith.customization", "conceptsmith.evaluation")


#: Architecture families (:func:`conceptsmith.models.detect_family`): UNet pipelines, then MMDiT ones.
UNET_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
MMDIT_FAMILIES: tuple[str, ...] = ("sd3", "flux")
ALL_FAMILIES: tuple[str, ...] = UNET_FAMILIES + MMDIT_FAMILIES
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}


class RegistryError(KeyError):
    """Unknown or duplicate plugin name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass
class EditRequest:
    """What to edit: the concepts and everything a method may anchor, preserve or learn from."""

    concepts: list[str]
    guide: str | None = None
    preserve: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    class_words: list[str] = field(default_factory=list)
    seed: int = 0


class EditorConfig(BaseModel):
    """Base of every editor's hyper-parameters: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class UnsupportedArchitectureError(ValueError):
    """The editor does not support the pipeline's architecture family."""


def families_text(families: tuple[str, ...]) -> str:
    """``("sd1", "sd2", "sdxl")`` -> ``"UNet pipelines (SD 1.x, 2.x, SDXL)"``; ``("sd3",)`` -> ``"SD3 pipelines"``."""
    unet = set(UNET_FAMILIES) <= set(families)
    names = [_FAMILY_NAMES.get(family, family) for family in families if not (unet and family in UNET_FAMILIES)]
    if unet:
        names.insert(0, "UNet pipelines (SD 1.x, 2.x, SDXL)")
    elif names:
        names[-1] += " pipelines"
    else:
        return "no architecture"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class Editor(abc.ABC):
    """An editing method: ``fit(pipe, request)`` returns an Edit and never mutates ``pipe``.

    ``supports`` names the architecture families the method works on (default: the UNet families);
    every subclass's ``fit`` first checks the pipeline's family and refuses others with one line.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[EditorConfig]] = EditorConfig
    supports: ClassVar[tuple[str, ...]] = UNET_FAMILIES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if fit is None or getattr(fit, "checks_architecture", False):
            return

        @functools.wraps(fit)
        def checked_fit(self: Editor, pipe: Any, request: EditRequest) -> Edit:
            from conceptsmith.identity import remembered

            self.check_architecture(pipe)
            with remembered(pipe):  # fit leaves the weights as they were: read the base identity once
                return fit(self, pipe, request)

        checked_fit.checks_architecture = True  # type: ignore[attr-defined]
        cls.fit = checked_fit  # type: ignore[method-assign]

    def check_architecture(self, pipe: Any) -> None:
        """Raise :class:`UnsupportedArchitectureError` unless ``pipe``'s family is in ``supports``."""
        from conceptsmith.models import detect_family

        if detect_family(pipe) not in self.supports:
            name = getattr(self, "name", type(self).__name__)
            raise UnsupportedArchitectureError(f"{name} supports {families_text(self.supports)}; got {type(pipe).__name__}")

    def __init__(self, config: EditorConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(dict(config))

    @abc.abstractmethod
    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        """Compute the edit of ``pipe`` that ``request`` asks for."""


class AttackConfig(EditorConfig):
    """Base of every attack's parameters (as strict as an editor's: unknown keys are errors)."""


class Attack(abc.ABC):
    """An attack on an edited model: ``plan(ctx)`` returns the conditions to generate and judge.

    ``ctx`` (:class:`conceptsmith.evaluation.attack_plugins.AttackContext`) holds the pipe with the edit
    applied, the edit, the erase prompts with their target concepts, the unedited model's images of them,
    the bench's templates / seeds / generation settings, a cache directory and the accelerate state; the plan is
    an :class:`conceptsmith.evaluation.attack_plugins.AttackPlan`. Both are typed ``Any`` here: the evaluation
    package that defines them sits above this registry.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(dict(config))

    @abc.abstractmethod
    def plan(self, ctx: Any) -> Any:
        """The attack conditions (prompt strings or ``prompt_embeds`` makers) with their targets."""


@dataclass(frozen=True)
class PluginEntry:
    """One registered plugin of a kind's table (``{name: entry}``); :func:`register_entry`, :func:`lookup_entry`
    and :func:`list_entries` are the table mechanics every kind uses (judges keep their table in
    :mod:`conceptsmith.evaluation.judges`)."""

    obj: Any
    description: str


_EDITORS: dict[str, PluginEntry] = {}
_METRICS: dict[str, PluginEntry] = {}
_HOOKS: dict[str, PluginEntry] = {}
_ATTACKS: dict[str, PluginEntry] = {}

E = TypeVar("E", bound=type[Editor])
A = TypeVar("A", bound=type[Attack])
F = TypeVar("F", bound=Callable[..., Any])


def register_entry(table: dict[str, PluginEntry], kind: str, name: str, obj: Any, description: str) -> None:
    """Add ``obj`` to ``table``; another object already under ``name`` is a :class:`RegistryError`."""
    existing = table.get(name)
    if existing is not None and existing.obj is not obj and _qualname(existing.obj) != _qualname(obj):
        raise RegistryError(f"A {kind} named '{name}' is already registered ({_qualname(existing.obj)}); pick another name.")
    table[name] = PluginEntry(obj, description)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_editor(name: str, description: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Editor` subclass available as ``name``."""

    def decorate(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Editor)):
            raise TypeError(f"register_editor('{name}') decorates Editor subclasses, got {cls!r}.")
        cls.name = name
        cls.description = description
        register_entry(_EDITORS, "editor", name, cls, description)
        return cls

    return decorate


def register_attack(name: str, description: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Attack` subclass available as ``name`` (a bench's ``kind``)."""

    def decorate(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack('{name}') decorates Attack subclasses, got {cls!r}.")
        cls.name = name
        cls.description = description
        register_entry(_ATTACKS, "attack", name, cls, description)
        return cls

    return decorate


@dataclass(frozen=True)
class Metric:
    """A registered benchmark metric: ``compute(ctx)`` returns the row's value (a number or a dict of numbers) or
    ``None`` where the row has nothing to measure; ``sections`` are the row sections whose context it reads
    (``erasure``; ``single``, ``composition``, ``relearn`` of customization benches); ``aggregation`` is how the
    summary combines rows (``mean`` over tasks / concepts / pairs, ``none``: not summarized)."""

    name: str
    description: str
    compute: Callable[[Any], Any]
    higher_is_better: bool | None = None
    aggregation: str = "mean"
    sections: tuple[str, ...] = ("erasure",)


def register_metric(
    name: str,
    description: str,
    *,
    higher_is_better: bool | None = None,
    aggregation: str = "mean",
    sections: tuple[str, ...] = ("erasure",),
) -> Callable[[F], F]:
    """Function decorator: make ``compute(ctx)`` the benchmark metric ``name`` (a bench YAML's ``metrics:``)."""
    if aggregation not in ("mean", "none"):
        raise ValueError(f"metric '{name}': aggregation must be 'mean' or 'none', got {aggregation!r}")

    def decorate(fn: F) -> F:
        spec = Metric(name, description, fn, higher_is_better, aggregation, tuple(sections))
        register_entry(_METRICS, "metric", name, spec, description)
        return fn

    return decorate


def register_hook(name: str, description: str = "") -> Callable[[F], F]:
    """Decorator for the factory behind ``hook`` Edits: ``factory(edit, pipe)`` returns a handle with ``remove()``."""

    def decorate(fn: F) -> F:
        register_entry(_HOOKS, "hook", name, fn, description)
        return fn

    return decorate


def load_builtin_plugins() -> None:
    """Import every public module of the built-in method packages so that they register."""
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package_name}.{module.name}")


def _load_entry_points(group: str) -> None:
    for entry_point in entry_points(group=group):
        entry_point.load()


def lookup_entry(
    table: dict[str, PluginEntry], kind: str, group: str | None, name: str, hint: str = "`conceptsmith methods`"
) -> Any:
    """The object registered as ``name``, loading the built-in plugins and the ``group`` entry points first if
    it is not there yet; unknown names are a :class:`RegistryError` listing the known ones."""
    if name not in table:
        load_builtin_plugins()
        if group is not None:
            _load_entry_points(group)
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise RegistryError(f"Unknown {kind} '{name}'. Available: {known}. ({hint} lists them.)")
    return table[name].obj


def list_entries(table: dict[str, PluginEntry], group: str | None) -> dict[str, str]:
    """``{name: description}`` of ``table`` after loading every plugin, sorted by name."""
    load_builtin_plugins()
    if group is not None:
        _load_entry_points(group)
    return {name: entry.description for name, entry in sorted(table.items())}


def get_editor(name: str) -> type[Editor]:
    return lookup_entry(_EDITORS, "editor", EDITOR_GROUP, name)


def get_metric(name: str) -> Metric:
    return lookup_entry(_METRICS, "metric", METRIC_GROUP, name)


def get_hook(name: str) -> Callable[..., Any]:
    return lookup_entry(_HOOKS, "hook", EDITOR_GROUP, name)


def get_attack(name: str) -> type[Attack]:
    return lookup_entry(_ATTACKS, "attack", ATTACK_GROUP, name, "`conceptsmith.registry.list_attacks()`")


def list_editors() -> dict[str, str]:
    return list_entries(_EDITORS, EDITOR_GROUP)


def list_metrics() -> dict[str, str]:
    return list_entries(_METRICS, METRIC_GROUP)


def list_attacks() -> dict[str, str]:
    return list_entries(_ATTACKS, ATTACK_GROUP)
