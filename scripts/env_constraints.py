"""The exact pip pins of a conda env file (envs/*.yaml) as pip constraints, standard library only:
`make setup*` installs the venvs the tests run with them, so the tests run the stacks the clusters'
envs pin (scripts/lock_envs.py writes those pins from the venvs; `make lock`).

    python scripts/env_constraints.py envs/monai.yaml > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def constraints(env_file: str | Path) -> list[str]:
    """``name==version`` of every pip entry of the env file's pip section (maskworks itself excluded)."""
    lines, in_pip = [], False
    for line in Path(env_file).read_text().splitlines():
        if re.match(r"^\s*-\s*pip:\s*$", line):
            in_pip = True
            continue
        m = re.match(r"^\s+-\s+([A-Za-z0-9_.\-]+==[^\s#;]+)", line)
        if in_pip and m:
            lines.append(m.group(1))
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("\n".join(constraints(sys.argv[1])))
