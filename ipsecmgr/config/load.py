"""Reading a configuration file: :func:`load_config` and ``check-config``."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipsecmgr.config.model import AclValidator, Config, ConfigDiagnosis, ConfigError
from ipsecmgr.config.parser import _Parser
from ipsecmgr.config_checks import MAX_CONFIG_BYTES, file_problem


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every error."""
    d = diagnose_config(path, environ=environ, validate_acl=validate_acl)
    if d.config is None:
        raise ConfigError(d.errors)
    return d.config


def check_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> list[str]:
    """All errors of a config file (empty list: valid). Warnings: :func:`diagnose_config`."""
    return diagnose_config(path, environ=environ, validate_acl=validate_acl).errors


def diagnose_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> ConfigDiagnosis:
    """Read a config file and return the config (or None), its errors and warnings."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        return ConfigDiagnosis(None, [f"{path}: cannot read: {getattr(e, 'strerror', 0) or e}"], [])
    problem = file_problem(raw)
    if problem is not None:
        return ConfigDiagnosis(None, [f"{path}: {problem}"], [])
    try:
        data = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        return ConfigDiagnosis(None, [f"{path}: not valid TOML: {e}"], [])
    except RecursionError:  # tomllib recurses per nesting level of arrays and tables
        return ConfigDiagnosis(None, [f"{path}: not valid TOML: nested too deeply"], [])
    return parse_config(data, base_dir=path.parent, environ=environ, validate_acl=validate_acl)


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> ConfigDiagnosis:
    """Validate an already parsed TOML document (see :func:`diagnose_config`)."""
    p = _Parser(base_dir, environ, validate_acl)
    cfg = p.parse(data)
    return ConfigDiagnosis(cfg if not p.errors else None, p.errors, p.warnings)


def format_diagnosis(path: str | Path, d: ConfigDiagnosis) -> str:
    """``ipsecmgr check-config`` output: errors, then warnings, then a verdict line."""
    lines = [f"error: {e}" for e in d.errors] + [f"warning: {w}" for w in d.warnings]
    if d.errors:
        lines.append(f"{path}: {len(d.errors)} error(s), {len(d.warnings)} warning(s)")
    else:
        lines.append(f"{path}: OK ({len(d.warnings)} warning(s))")
    return "\n".join(lines)
