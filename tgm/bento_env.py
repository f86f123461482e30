"""The Bento's Python environment is the tested one: the packages bentofile.yaml names, and everything they need
at run time, each at the version constraints.txt pins (the versions the tests ran with), never resolved anew."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from tgm.errors import UserError

BUILD_TOOLS = {"pip", "setuptools", "wheel"}  # the installer's own, outside pip freeze


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: str | Path) -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    found = {}
    for line in Path(constraints).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonical(name)] = version.strip()
    return found


def closure(names: list[str]) -> set[str]:
    """`names` and every package they require at run time here (no extras), transitively."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name in BUILD_TOOLS:
            continue
        seen.add(name)
        try:
            needed = requires(name) or []
        except PackageNotFoundError:
            raise UserError(f"bentofile.yaml names {name}, which is not installed here") from None
        for text in needed:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


def pinned_requirements(names: list[str], constraints: str | Path = "constraints.txt") -> str:
    """requirements.txt text: the closure of `names`, each pinned as constraints.txt pins it."""
    pinned, needed = pins(constraints), closure(names)
    missing = sorted(needed - set(pinned))
    if missing:
        raise UserError(f"{constraints} pins no version of {', '.join(missing)}: regenerate it (its header says how)")
    return "".join(f"{name}=={pinned[name]}\n" for name in sorted(needed))
