"""Job settings in one place: the library's frozen dataclasses, and Hydra's view of them.

Every default and every check of a job lives in its frozen dataclass (`SegmentConfig`, `RefineConfig`,
`TrainConfig`, `Distributed`, `Tracking`, ...). Hydra's structured configs are generated here from
those dataclasses (same names, types and defaults), so the YAML files in `pipeline/conf/` only
override, and the typed CLI (`pipeline.cli`) builds the same objects from its options. A job's
Hydra config is a `Layout`: which dataclass fields sit at the top level and which in a section
(`tiling.block`, `cluster.address`).

"Cluster" is said one way by every job: the `cluster` section (`address`, `device`, `workers`,
`threads`), `cluster=remote` to join the cluster named by RAY_ADDRESS, and `--address`/`--device` on
the command line.

The configs ship inside the package (`CONF`), so an installed tessera finds them from any folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import ConfigError

CONF = Path(__file__).resolve().parent / "conf"
# The keys every job's `cluster` section has; a job adds its own (segment: actors_per_gpu, ...).
CLUSTER_KEYS = ("address", "device", "workers", "threads")
# Keys that moved when every job came to say "cluster" the same way.
MOVED = {
    "distributed.workers": "cluster.workers", "distributed.threads": "cluster.threads",
    "distributed.address": "cluster.address", "distributed.use_gpu": "cluster.device=cuda",
    "threads": "cluster.threads",
}


@dataclass(frozen=True)
class Part:
    """Fields of the dataclass `cls` that sit in one section of a job's Hydra config (None: the top level).

    `fields` None takes every field of `cls` not placed in another part.
    """

    cls: type
    section: str | None = None
    fields: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Extra:
    """A key only the front door reads (e.g. segment's `glob`): its type and default."""

    name: str
    type: Any
    default: Any = None
    section: str | None = None


@dataclass(frozen=True)
class Layout:
    """A job's Hydra config (`pipeline/conf/<name>.yaml`) as sections of the library's dataclasses."""

    name: str
    parts: tuple[Part, ...]
    extras: tuple[Extra, ...] = ()
    # Fields that are dataclasses of their own (tracking, crf): a section each, named as the field.
    nested: Mapping[str, type] = field(default_factory=dict)
    # Types Hydra accepts where the front door takes more than the dataclass (segment's `source`: a list).
    types: Mapping[str, Any] = field(default_factory=dict)
    # Defaults Hydra gives where the dataclass has none (train's image: null when a catalog is given).
    given: Mapping[str, Any] = field(default_factory=dict)
    # Fields not read from the config as they are: the front door builds them from several sections
    # (nightly's train, tracking, distributed), or the job does not use them (nightly's Tracking.experiment).
    skip: tuple[str, ...] = ()

    def placement(self, cls: type) -> dict[str, str | None]:
        """Field name of `cls` -> the section holding it (None: top level)."""
        names = [f.name for f in dataclasses.fields(cls)]
        placed: dict[str, str | None] = {}
        for part in self.parts:
            if part.cls is cls and part.fields is not None:
                placed.update({name: part.section for name in part.fields})
        rest = [part for part in self.parts if part.cls is cls and part.fields is None]
        for name in names:
            if name not in placed and name not in self.nested and name not in self.skip and rest:
                placed[name] = rest[0].section
        unplaced = sorted(set(names) - set(placed) - set(self.nested) - set(self.skip))
        if unplaced:
            raise AssertionError(f"{self.name}: {cls.__name__} fields {unplaced} have no place in the Hydra config")
        return placed

    def schema(self) -> type:
        """The structured config Hydra validates this job's YAML and overrides against."""
        sections: dict[str | None, list[tuple[str, Any, Any]]] = {}
        for cls in dict.fromkeys(part.cls for part in self.parts):
            hints = typing.get_type_hints(cls)
            known = {**defaults(cls), **self.given}
            for name, section in self.placement(cls).items():
                entries = sections.setdefault(section, [])
                if any(e[0] == name for e in entries):  # two dataclasses read one key (train's cluster.threads)
                    continue
                kind = self.types.get(name, _hydra_type(hints[name]))
                entries.append((name, kind, known.get(name, dataclasses.MISSING)))
        for extra in self.extras:
            sections.setdefault(extra.section, []).append((extra.name, _hydra_type(extra.type), extra.default))
        specs = [_spec(*entry) for entry in sections.pop(None, [])]
        owners = {f.name: cls for part in self.parts for f in dataclasses.fields(part.cls)}
        for name, cls in self.nested.items():
            given = defaults(owners[name]).get(name) if name in owners else None
            nested = _schema_of(f"{self.name}_{name}", cls, given, self.given)
            specs.append((name, nested, field(default_factory=nested)))
        for section, entries in sections.items():
            assert section is not None
            cls = dataclasses.make_dataclass(f"{self.name}_{section}", [_spec(*e) for e in entries])
            specs.append((section, cls, field(default_factory=cls)))
        return dataclasses.make_dataclass(f"{self.name}_schema", specs)  # required keys default to ??? (MISSING)

    def values(self, cfg: Any, cls: type) -> dict[str, Any]:
        """The settings of `cls` in a composed Hydra config, as plain Python values (nested dataclasses built)."""
        missing = _missing(cfg)
        if missing:
            one = len(missing) == 1
            raise ConfigError(f"{', '.join(missing)} {'is' if one else 'are'} not set: give {'it' if one else 'them'} "
                              f"on the command line, e.g. {missing[0]}=...")
        out: dict[str, Any] = {}
        for name, nested_cls in self.nested.items():
            if name in {f.name for f in dataclasses.fields(cls)} and name not in self.skip:
                out[name] = nested_cls(**self.section(cfg, name))
        for name, section in self.placement(cls).items():
            node = cfg if section is None else cfg[section]
            out[name] = _plain(node[name])
        return out

    def section(self, cfg: Any, name: str) -> dict[str, Any]:
        """One section of a composed config as plain Python values."""
        return {str(k): _plain(v) for k, v in cfg[name].items()}


def _missing(cfg: Any, prefix: str = "") -> list[str]:
    """The required keys of a composed config that no one set (`???`)."""
    from omegaconf import DictConfig, OmegaConf

    out: list[str] = []
    for key in cfg:
        if OmegaConf.is_missing(cfg, key):
            out.append(f"{prefix}{key}")
        elif isinstance(cfg[key], DictConfig):
            out.extend(_missing(cfg[key], f"{prefix}{key}."))
    return out


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass, by field name (what the CLI shows and starts from)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _schema_of(name: str, cls: type, instance: Any = None, given: Mapping[str, Any] | None = None) -> type:
    """A plain (mutable) dataclass with the fields and types of the frozen dataclass `cls`, and its defaults
    (or the values of `instance`, the default an owning dataclass gives it; `given` where it has none)."""
    hints = typing.get_type_hints(cls)
    known = {**(given or {}), **(dataclasses.asdict(instance) if instance is not None else defaults(cls))}
    return dataclasses.make_dataclass(
        name, [_spec(f.name, _hydra_type(hints[f.name]), known.get(f.name, dataclasses.MISSING))
               for f in dataclasses.fields(cls)])


def _spec(name: str, kind: Any, default: Any) -> tuple[str, Any, Any]:
    """A make_dataclass field: a required key (MISSING: Hydra's ???), a mutable default, or a plain one."""
    if default is dataclasses.MISSING:
        from omegaconf import MISSING

        return (name, kind, field(default=MISSING))
    if isinstance(default, (list, dict, tuple)) or dataclasses.is_dataclass(default):
        return (name, Any, field(default_factory=lambda: copy.deepcopy(list(default) if isinstance(default, tuple)
                                                                          else default)))
    return (name, kind, field(default=default))


def _hydra_type(hint: Any) -> Any:
    """The type OmegaConf checks a value against: the scalar types, optional or not; Any for the rest."""
    scalar = (bool, int, float, str)
    if hint in scalar:
        return hint
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in scalar:
            return Optional[rest[0]]  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
    return Any


def register(layouts: Sequence[Layout]) -> None:
    """Store each layout's schema in Hydra's ConfigStore as `<name>_schema` (its YAML's first default)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for layout in layouts:
        store.store(name=f"{layout.name}_schema", node=layout.schema())


def compose(layout: Layout, overrides: Sequence[str]) -> Any:
    """`pipeline/conf/<name>.yaml` with Hydra overrides, as the job modules see it.

    Raises:
        ConfigError: An override names an unknown key or gives a value of the wrong type.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register([layout])
    check_moved(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=layout.name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        text = f"{exc}\n{exc.__cause__ or ''}"
        said = [line.strip().rstrip(".") for line in text.splitlines()
                if line.strip() and not line.startswith((" ", "To append"))][:2]
        raise ConfigError(f"{': '.join(said)}; overrides are key=value, e.g. steps=400.") from None


def check_moved(overrides: Sequence[str]) -> None:
    """An override of a key that moved fails naming its new place.

    Raises:
        ConfigError: naming the key to use instead.
    """
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in MOVED:
            raise ConfigError(f"{key} is now {MOVED[key]} (every job says cluster the same way): e.g. "
                              f"{MOVED[key] if '=' in MOVED[key] else MOVED[key] + '=' + override.partition('=')[2]}")


def settings_json(settings: Any) -> str:
    """A job's settings object as the JSON that `--show-config` and `show_config=true` print."""
    return json.dumps(dataclasses.asdict(settings), indent=2)
