"""Reading and validating ``params.yaml``: :data:`SECTIONS` (section name -> schema class, in the file's order),
the YAML loader (YAML 1.2 numbers, duplicated keys rejected) and the loaders every stage and ``slotcon check`` use;
each problem is one line naming the file, the key, the value and what is allowed."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from components.config.data import DataConfig, ScenesConfig, ShardConfig, TrackingConfig
from components.config.pretrain import ExportConfig, PretrainConfig
from components.config.schema import ConfigError, Section, resume_safe_fields
from components.config.transfer import DetectConfig, ProbeConfig, SegmentConfig, UnsupConfig, VizConfig

DEFAULT_PARAMS = Path(os.environ.get("SLOTCON_PARAMS", "params.yaml"))

SECTIONS: dict[str, type[Section]] = {
    "tracking": TrackingConfig,
    "scenes": ScenesConfig,
    "data": DataConfig,
    "shard": ShardConfig,
    "pretrain": PretrainConfig,
    "export": ExportConfig,
    "detect": DetectConfig,
    "segment": SegmentConfig,
    "probe": ProbeConfig,
    "unsup": UnsupConfig,
    "viz": VizConfig,
}


def _format_error(path: Path, section: str, raw: dict[str, Any], err: ValidationError) -> str:
    """One line: file, dotted key, value, what is allowed."""
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        model: Any = SECTIONS[section]
        for part in e["loc"][:-1]:  # a nested subsection: list the fields of that level
            model = model.model_fields[part].annotation
        allowed = ", ".join(model.model_fields)
        return f"{path}: unknown key {section}.{loc} (allowed: {allowed})"
    if not loc:  # a whole-section (combination) check
        return f"{path}: {section}.{msg}"
    value: Any = raw
    shown: list[str] = []
    for part in e["loc"]:  # the value given; the parts past it name a union member ("int", "float"), not a key
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            break
        shown.append(str(part))
    if not shown:
        return f"{path}: {section}.{loc} is invalid: {msg}"
    key = ".".join(shown)
    if isinstance(value, dict):  # a combination check inside a subsection
        return f"{path}: {section}.{key}.{msg}"
    return f"{path}: {section}.{key}={value!r} is invalid: {msg}"


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for params files: ``1e-6`` is a float (YAML 1.2, as DVC's ruamel reads it;
    YAML 1.1 needs a dot and a signed exponent and would give the string ``'1e-6'``), and a key given twice in one
    mapping is an error instead of silently keeping the last value."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    first = seen[key]
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, path: str | os.PathLike) -> Any:
    """``text`` as YAML with :class:`_ParamsLoader`; a syntax error is one line ``path:LINE:COL: what is wrong``."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise ConfigError(f"{where}: {what}") from None
        raise ConfigError(f"{where}: YAML syntax error: {what} (check indentation, ':' after each key, quotes)") \
            from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    """The whole params file as a dict of sections (known section names only; sections not validated here)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, or pass --params)")
    data = parse_yaml(read_utf8(path), path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it needs the sections {', '.join(SECTIONS)} "
                          f"(restore it with `git checkout -- {path}`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (allowed: {', '.join(SECTIONS)})")
    return data


def read_utf8(path: Path) -> str:
    """The text of a params file; one line naming the file when its bytes are not UTF-8 (YAML's encoding)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}; "
                          "e.g. saved as Latin-1); save the file as UTF-8") from None


def _missing(path: Path, names: list[str]) -> ConfigError:
    which = ", ".join(names)
    return ConfigError(f"{path}: section(s) {which} missing: each stage reads its own section and never falls back "
                       "to built-in defaults; add them (defaults: `git show HEAD:params.yaml`, paper recipes: "
                       "docs/presets/)")


def parse_section(section: str, raw: dict[str, Any] | None, path: str | os.PathLike = DEFAULT_PARAMS) -> Section:
    if section not in SECTIONS:
        raise ConfigError(f"{path}: no such section {section!r} (allowed: {', '.join(SECTIONS)})")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: section {section} must be a mapping, got {type(raw).__name__}")
    try:
        return SECTIONS[section].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(path), section, raw, err)) from None


def load_section(section: str, path: str | os.PathLike = DEFAULT_PARAMS):
    """Load and validate one section of ``params.yaml``; raises :class:`ConfigError` with a one-line message (also
    when the section is absent: a stage never runs on silent built-in defaults)."""
    data = read_params(path)
    if section in SECTIONS and section not in data:
        raise _missing(Path(path), [section])
    return parse_section(section, data.get(section), path)


def load_all(path: str | os.PathLike = DEFAULT_PARAMS, required: Iterable[str] | None = None) -> dict[str, Section]:
    """Validate every section present, and require ``required`` (default: all) to be present; used by ``slotcon
    check`` and the Prefect flow before any stage runs. Returns the validated sections, by name."""
    data = read_params(path)
    need = list(SECTIONS) if required is None else [s for s in SECTIONS if s in set(required)]
    missing = [s for s in need if s not in data]
    if missing:
        raise _missing(Path(path), missing)
    return {name: parse_section(name, data.get(name), path) for name in SECTIONS if name in data or name in need}


def resume_safe_keys(sections: Mapping[str, type[Section]] | None = None) -> frozenset[str]:
    """Top-level keys marked ``resume_safe`` in any section: a checkpoint stays valid when they change (the
    fingerprint of :mod:`components.engine.checkpoint` leaves them out)."""
    chosen = SECTIONS if sections is None else sections
    return frozenset(key for cls in chosen.values() for key in resume_safe_fields(cls))
