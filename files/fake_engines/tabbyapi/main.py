#!/usr/bin/env python3
"""Stand-in for TabbyAPI's main.py: `cd DIR && PY main.py --model-name MODEL [ARGS...]`.

Reads ./config.yml from the working directory like the real one.  Symlink this file to DIR/main.py (or copy it
and set FAKE_ENGINES_DIR to the directory holding fake_engine.py).
"""

import os
import sys


def _engines_dir() -> str:
    env = os.environ.get("FAKE_ENGINES_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.dirname(here), here, "/opt/fake-engines"):
        if os.path.exists(os.path.join(candidate, "fake_engine.py")):
            return candidate
    return os.path.dirname(here)


if __name__ == "__main__":
    sys.path.insert(0, _engines_dir())
    import fake_engine

    sys.exit(fake_engine.main(["--kind", "tabbyapi", *sys.argv[1:]]))
