"""The experiment process: ``python -m chaos._child WORKDIR``.

Runs one experiment with chaoslib (>= 1.45) in the main thread of its own process (chaoslib installs
signal handlers), reading ``experiment.json``, ``settings.json`` and ``options.json`` from WORKDIR, writing
``journal.json`` (or ``error.json``) there. The parent (:mod:`chaos.runner`) enforces the budget,
cleans up and judges; this process decides nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_bytes


def _write(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, default=str, sort_keys=True).encode("utf-8"))


def _require_chaoslib() -> None:
    """1.44 swallows SIGTERM/InterruptExecution inside a python activity and goes on injecting."""
    import chaoslib

    major, minor = (int(x) for x in chaoslib.__version__.split(".")[:2])
    if (major, minor) < (1, 45):
        raise RuntimeError(f"chaostoolkit-lib >= 1.45 is required, found {chaoslib.__version__}")


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    logging.basicConfig(
        filename=str(workdir / "chaostoolkit.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from chaoslib.control import load_global_controls

        _require_chaoslib()
        from chaoslib.experiment import ensure_experiment_is_valid, run_experiment

        experiment = json.loads((workdir / "experiment.json").read_text(encoding="utf-8"))
        settings = json.loads((workdir / "settings.json").read_text(encoding="utf-8"))
        options = json.loads((workdir / "options.json").read_text(encoding="utf-8"))
        # A ``dry`` key in a file does nothing in chaoslib (only the enum does); only ours counts.
        experiment.pop("dry", None)
        if options.get("dry"):
            from chaoslib.types import Dry

            experiment["dry"] = Dry.from_string(str(options["dry"]))
        load_global_controls(settings)
        ensure_experiment_is_valid(experiment)
        journal = run_experiment(experiment, settings=settings)
    except BaseException as exc:
        _write(
            workdir / "error.json", {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        )
        return 3
    _write(workdir / "journal.json", journal)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
