"""The docs match behaviour: CI runs the README's test command; the parameter table is complete."""

from __future__ import annotations

import re
from pathlib import Path

from clarity.params import param_fields

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_parameter_table_lists_every_parameter_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", readme, flags=re.M)}
    for f in param_fields():
        assert f.name in rows, f"README parameter table lacks {f.name}"
        default = rows[f.name].strip().strip("`")
        if isinstance(f.default, bool):
            expected = str(f.default).lower()
        else:
            expected = f.default if isinstance(f.default, str) else f"{f.default:g}"
        assert default == expected, f"README default of {f.name} is {default}, code says {expected}"
