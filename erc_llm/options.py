"""Typed options: dataclass fields that carry their help text, choices and numeric bounds; an instance built from
a YAML file plus command-line overrides, with unknown keys and every bad value reported at once; the command
line generated from the same fields. ``erc_llm.config`` declares the schemas with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def option(default, help: str, choices: tuple | None = None, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None):
    """A documented field; numbers may carry bounds (``ge``/``gt``/``le``/``lt``) that :func:`build` checks,
    together with finiteness, for every number of every config."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    meta.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice_problems(cfg) -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            out.append(f"{f.name}: {value!r} is not valid; expected one of {list(choices)}")
    return out


def number_problems(cfg) -> list[str]:
    """Every int/float field: finite, and within the bounds its field declares."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            out.append(f"{f.name}: {value} is not a finite number")
            continue
        m = f.metadata
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if key in m and not ok(value, m[key]):
                out.append(f"{f.name}: {value} is out of range; expected {word} {m[key]}")
    return out


def _coerce(name: str, tp, value):
    tp = {"str": str, "int": int, "float": float, "bool": bool, "list": list}.get(tp, tp) if isinstance(tp, str) else tp
    if tp is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return value
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def build(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """Instance of ``cls`` from a YAML file plus overrides; raises ConfigError listing all problems."""
    values: dict = {}
    problems: list[str] = []
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {yaml_path}: cannot read ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {yaml_path}: expected a mapping of keys to values")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(values) - known):
        problems.append(f"{key}: unknown key; available keys = {sorted(known)}")
    kwargs = {}
    for key in sorted(set(values) & known):
        try:
            kwargs[key] = _coerce(key, hints[key], values[key])
        except ConfigError as e:
            problems.append(str(e))
    cfg = cls(**kwargs) if not problems else None
    if cfg is not None:
        problems.extend(number_problems(cfg))
        problems.extend(q for q in cfg.problems() if q not in problems)
    if problems:
        src = f" ({yaml_path})" if yaml_path else ""
        raise ConfigError(f"{len(problems)} config problem(s){src}:\n  - " + "\n  - ".join(problems))
    return cfg


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field (defaults left to the dataclass so YAML values are not overridden)."""
    parser.add_argument("--config", help="YAML config file (an instance of this schema)")
    default = defaults(cls)
    for f in dataclasses.fields(cls):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
            choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {default[f.name]!r})",
        )


def defaults(cls) -> dict:
    """The schema's default value of every field."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return build(cls, args.config, {k: v for k, v in vars(args).items() if k in names})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
