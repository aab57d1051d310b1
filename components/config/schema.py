"""What every ``params.yaml`` key is made of: :func:`knob` gives one key its default, its bounds, the comment
``params.yaml`` shows beside it (``paper:`` / ``released code:`` values included) and whether changing it keeps a
checkpoint valid (``resume_safe``). A section's class docstring, its ``name``: prefix and double backquotes dropped,
is the comment on the section's header line. :class:`Section` is the strict, frozen base of every section.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from components.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad ``params.yaml`` value: the message is one line naming the key, the value and what is allowed."""


class Section(BaseModel):
    """Base of all sections: frozen, strict about unknown keys and types (no silent str->int coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


def knob(default: Any, doc: str = "", *, above: str = "", resume_safe: bool = False, **bounds: Any) -> Any:
    """One key: ``default`` (a list is copied per instance), ``doc`` (its comment in ``params.yaml``), ``above``
    (comment lines written above the key), ``resume_safe`` (it may differ between a checkpoint and the run resuming
    it: it changes no number a step computes) and pydantic's ``bounds`` (``ge``, ``min_length`` ...)."""
    extra: dict[str, Any] = {}
    if above:
        extra["above"] = above
    if resume_safe:
        extra["resume_safe"] = True
    kwargs: dict[str, Any] = dict(description=doc or None, json_schema_extra=extra or None, **bounds)
    if isinstance(default, list):
        items = list(default)
        return Field(default_factory=lambda: list(items), **kwargs)
    return Field(default=default, **kwargs)


def meta(info: FieldInfo, key: str) -> Any:
    """The ``knob`` metadata ``key`` (``above``, ``resume_safe``) of one field, None when not given."""
    extra = info.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def subsection(info: FieldInfo) -> type[Section] | None:
    """The section class of a nested subsection field (``pretrain.slotcon``), None for a plain key."""
    kind = info.annotation
    return kind if inspect.isclass(kind) and issubclass(kind, Section) else None


def section_doc(cls: type[Section]) -> str:
    """The header comment of a section: its (or its nearest section ancestor's) docstring as one plain line."""
    doc = next((c.__dict__["__doc__"] for c in cls.__mro__
                if c is not Section and issubclass(c, Section) and c.__dict__.get("__doc__")), "")
    text = " ".join(inspect.cleandoc(doc).split())
    return re.sub(r"^``[\w.]+``: ", "", text).replace("``", "").removesuffix(".")


def resume_safe_fields(cls: type[Section]) -> list[str]:
    """The keys of ``cls`` (top level only: a checkpoint fingerprint filters by top-level key) marked resume_safe."""
    return [name for name, info in cls.model_fields.items() if meta(info, "resume_safe")]


# Upper bounds of values that can only be mistakes (a typo, an exponent): refused in one line before any work, not
# a 51 GB allocation or a seed that overflows the generators.
SEED_MAX = 2**32 - 1  # what NumPy's and Python's generators take
MAX_PIXELS = 4096  # image sides (crops, resolutions, resize targets)
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000  # iterations / optimiser steps
MAX_BATCH = 65_536
MAX_WORKERS = 1024  # processes: loader workers, writers, ranks per node, nodes
MAX_QUEUE = 1 << 24
