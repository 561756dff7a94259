"""Loads the fixtures that the core tests and the integrations' tests share (tests/_servers.py)."""

import sys
from pathlib import Path

# --import-mode=importlib puts no test folder on sys.path; the shared helpers live in tests/.
sys.path.insert(0, str(Path(__file__).parent / "tests"))

pytest_plugins = ["_servers"]
