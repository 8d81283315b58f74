"""Where things are, for tests that run the scripts or spawn processes."""

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[1]
SCRIPTS = REPO / "scripts"
