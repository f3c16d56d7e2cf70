"""`make demo`: the main job on embedded defaults, end to end, in a temporary directory.

It grows with every capability: provision a device, publish real ONNX models to a local hub, pull and
verify, canary, chaos, triage, uplink, report. Run: ``python -m sre_agent.demo [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from deployment.sample_models import linear_classifier
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths

__all__ = ["main", "run_demo"]


def run_demo(workdir: Path, console: Console) -> int:
    """Run every demo chapter in ``workdir``; returns an exit code."""
    console.print(Panel.fit("sre-agent demo: an autonomous SRE on an edge AI device", style="bold cyan"))
    device = StatePaths(workdir / "device")
    console.rule("1. provision a device")
    result = provision(device)
    console.print(f"device [bold]{result['device_id']}[/bold], state in {device.root}")
    console.rule("2. build a real ONNX model")
    model = workdir / "model-v1.onnx"
    model.write_bytes(linear_classifier(seed=1))
    console.print(f"model v1: {model} ({model.stat().st_size} bytes)")
    n, broken = AuditLog(device.audit_log).verify()
    console.rule("summary")
    console.print(f"audit trail: {n} records, chain {'intact' if broken is None else 'BROKEN'}")
    console.print(f"files are in [bold]{workdir}[/bold]")
    return 0 if broken is None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args(argv)
    console = Console()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run_demo(args.keep, console)
    workdir = Path(tempfile.mkdtemp(prefix="sre-agent-demo-"))
    return run_demo(workdir, console)


if __name__ == "__main__":
    sys.exit(main())
