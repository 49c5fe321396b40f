"""Shared by the tests of the scripts that print documentation tables (scripts/*_tables.py)."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tables(lines):
    """The markdown tables in ``lines``, each a list of rows of stripped cells."""
    out, cur = [], []
    for line in list(lines) + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip()[1:-1].split("|")])
        elif cur:
            out.append(cur)
            cur = []
    return out
