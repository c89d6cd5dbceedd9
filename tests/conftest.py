"""Makes `tests/testkit` (shared test fixtures: seeded random LoRA files, UNet architectures) importable
from every test folder, whichever folder pytest starts in."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
