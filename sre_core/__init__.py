"""The small shared core every package uses: clock, state paths, atomic writes, errors, logging, audit.

Nothing here imports the rest of the project; `deployment`, `verification`, `chaos`, `policies`,
`sre_agent` and `hub` all build on it.
"""

from sre_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from sre_core.clock import Clock, FakeClock, SystemClock
from sre_core.errors import ConfigError, InputError, SreError
from sre_core.paths import StatePaths

__all__ = [
    "Clock",
    "ConfigError",
    "FakeClock",
    "InputError",
    "SreError",
    "StatePaths",
    "SystemClock",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
]
