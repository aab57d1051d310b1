"""Typed, validated sections of ``params.yaml``, and the one place their defaults and comments are written.

Each field (:func:`~components.config.schema.knob`) holds its default (the CPU demo, the value ``params.yaml``
holds), bounds, comment (``paper:`` / ``released code:`` values) and whether it is ``resume_safe``; ``slotcon params
--write`` generates ``params.yaml`` from them and ``--check`` fails when the file differs. Stages read one section
through :func:`load_section`; a bad value is one line, e.g. ``params.yaml: pretrain.batch_size=100 is not divisible by
world size 8``."""
from __future__ import annotations

from components.config.data import DataConfig, ScenesConfig, ShardConfig, TrackingConfig
from components.config.load import (DEFAULT_PARAMS, SECTIONS, load_all, load_section, parse_section, parse_yaml,
                                    read_params, resume_safe_keys)
from components.config.pretrain import ExportConfig, MocoV2Params, PretrainConfig, SimParams, SlotConParams
from components.config.schema import ConfigError, Section, knob
from components.config.transfer import (SEGMENT_METHODS, DetectConfig, InitKind, ProbeConfig, ReCoParams,
                                        SegmentConfig, SemiSupParams, UnsupConfig, VizConfig)

__all__ = [
    "DEFAULT_PARAMS", "SECTIONS", "SEGMENT_METHODS", "ConfigError", "DataConfig", "DetectConfig", "ExportConfig",
    "InitKind", "MocoV2Params", "PretrainConfig", "ProbeConfig", "ReCoParams", "ScenesConfig", "Section",
    "SegmentConfig", "SemiSupParams", "ShardConfig", "SimParams", "SlotConParams", "TrackingConfig", "UnsupConfig",
    "VizConfig", "knob", "load_all", "load_section", "parse_section", "parse_yaml", "read_params", "resume_safe_keys",
]
