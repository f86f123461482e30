"""Profiles: named sets of params overrides (profiles/NAME.yaml, shaped like a part of params.yaml), checked
against params.yaml and given to DVC as `dvc exp run -S group.key=value` arguments.

    python -m tgm.profiles profiles/gpu.yaml     # prints: -S prepare.image_size=28 -S model.n_layer=8 ...

A profile that names an unknown group or key, or a value params.yaml's rules refuse, is an error here, before
DVC starts anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tgm.errors import UserError
from tgm.params import Params, parse_params


def overrides(profile: str | Path) -> dict[str, object]:
    """{"group.key": value} of a profile file."""
    raw = yaml.safe_load(Path(profile).read_text()) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UserError(f"{profile}: expected groups of keys, like params.yaml")
    return {f"{group}.{key}": value for group, keys in raw.items() for key, value in keys.items()}


def apply(profile: str | Path, params_path: str | Path = "params.yaml") -> Params:
    """params.yaml with the profile's values, checked as params.yaml is."""
    params = yaml.safe_load(Path(params_path).read_text())
    for name, value in overrides(profile).items():
        group, key = name.split(".")
        if group not in params or key not in (params[group] or {}):
            raise UserError(f"{profile}: {name} is not a key of {params_path}")
        params[group][key] = value
    return parse_params(params)


def dvc_arguments(profile: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    apply(profile, params_path)
    return [arg for name, value in overrides(profile).items() for arg in ("-S", f"{name}={as_value(value)}")]


def as_value(value) -> str:
    """A value as `dvc exp run -S` reads it (YAML), in one word: a list as [10,100], so that a shell splitting
    the arguments on spaces (the Makefile's $$args) keeps it whole."""
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m tgm.profiles profiles/NAME.yaml")
    try:
        args = dvc_arguments(argv[0])
        # Printed for the shell to split on spaces ($$args in the Makefile), so no argument may hold one.
        if any(" " in a or "'" in a for a in args):
            raise UserError(f"{argv[0]}: a value with a space or a quote cannot pass through `make`: {args}")
        print(" ".join(args))
    except (UserError, OSError) as exc:
        sys.exit(f"tgm.profiles: error: {exc}")


if __name__ == "__main__":
    main()
