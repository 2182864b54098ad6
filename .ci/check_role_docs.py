"""Options are documented once, in each role's meta/argument_specs.yml (`ansible-doc -t role`).

Fails when a role's defaults/main.yml and its argument spec disagree: a default without an
option, an option with a default that defaults/main.yml does not set, or a literal default
(one without Jinja) whose value differs. Templated defaults may be described in prose.

    python3 .ci/check_role_docs.py [ROLES_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


def templated(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, list):
        return any(templated(v) for v in value)
    if isinstance(value, dict):
        return any(templated(v) for v in value.values())
    return False


def check(role: Path) -> list[str]:
    defaults_file = role / "defaults" / "main.yml"
    defaults = (yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else None) or {}
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"].get("options", {})
    problems = []
    for key in sorted(set(defaults) - set(options)):
        problems.append(f"{key}: in defaults/main.yml, not in meta/argument_specs.yml")
    for key in sorted(k for k, v in options.items() if "default" in v and k not in defaults):
        problems.append(f"{key}: documented with a default, not set in defaults/main.yml")
    for key, value in defaults.items():
        if key in options and not templated(value) and options[key].get("default") != value:
            problems.append(
                f"{key}: defaults/main.yml has {value!r}, the argument spec says "
                f"{options[key].get('default')!r}"
            )
    return [f"roles/{role.name}: {p}" for p in problems]


def main(argv: list[str]) -> int:
    roles = Path(argv[0] if argv else "roles")
    problems = [p for role in sorted(roles.iterdir()) if role.is_dir() for p in check(role)]
    print("\n".join(problems) or f"role docs: defaults and argument specs agree ({roles})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
