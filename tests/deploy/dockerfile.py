"""Reading deploy/Dockerfile in tests: its instructions by stage, as Docker reads them (continuation lines joined,
comments and parser directives dropped)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass
class Stage:
    """One FROM ... AS name block."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """ENV values of this stage (KEY=VALUE form)."""
        pairs = (token.split("=", 1) for args in self.all("ENV") for token in shlex.split(args))
        return {key: value for key, value in pairs}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for every instruction of the file."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments (and directives) may sit between continuation lines
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        elif pending.strip():
            logical.append(pending.strip())
            pending = ""
    return [(kw.upper(), re.sub(r"\s+", " ", args)) for kw, _, args in (s.partition(" ") for s in logical)]


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The build stages, in order (global ARGs before the first FROM are left out)."""
    found: list[Stage] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            found.append(Stage(name.strip(), base.strip()))
        elif found:
            found[-1].instructions.append((keyword, args))
    return found


def global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ARG's default, from any stage (ARG NAME=value or ARG NAME="value")."""
    pairs = (shlex.split(args)[0].split("=", 1) for kw, args in instructions(path) if kw == "ARG" and "=" in args)
    return {key: value for key, value in pairs}


def healthcheck_command(stage: Stage) -> list[str]:
    """The exec-form CMD of the stage's HEALTHCHECK."""
    (check,) = stage.all("HEALTHCHECK")
    return list(json.loads(check.split(" CMD ", 1)[1]))
