"""Data integrity: installed slots against their signed digests, the DuckDB telemetry file, the audit
chain."""

from __future__ import annotations

from typing import Any

from sre_core.audit import AuditLog
from verification.base import Check, CheckResult, Severity
from verification.builtin._model import intact
from verification.context import VerificationContext

__all__ = ["AuditChainCheck", "SlotDigestCheck", "TelemetryDbCheck"]


class SlotDigestCheck(Check):
    """Re-hash every installed slot (active and standby) against the digest it was installed with."""

    name = "integrity.slots"
    description = "installed slots re-hash to their signed digests"
    severity = Severity.CRITICAL
    interval_s = 3600.0
    timeout_s = 120.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        evidence: dict[str, Any] = {}
        bad: list[str] = []
        for slot in sorted(ctx.slots, key=lambda s: (s.module, s.role)):
            key = f"{slot.module}/{slot.role}"
            ok, why = intact(slot)
            evidence[key] = {"slot": slot.slot, "version": slot.version, "ok": ok, "detail": why}
            if not ok:
                bad.append(key)
        if bad:
            return CheckResult.fail(
                f"corrupted slot(s): {', '.join(bad)}", evidence, corrupted=len(bad), slots=len(ctx.slots)
            ).about({k.split("/")[0] for k in bad})
        if not ctx.slots:
            return CheckResult.inconclusive("no slot is installed", evidence)
        return CheckResult.ok(f"{len(ctx.slots)} slot(s) intact", evidence, corrupted=0, slots=len(ctx.slots))


class TelemetryDbCheck(Check):
    """Open the DuckDB telemetry file and scan every table (DuckDB verifies block checksums on read)."""

    name = "integrity.telemetry_db"
    description = "the DuckDB telemetry file opens and every table scans with valid block checksums"
    severity = Severity.WARNING
    interval_s = 3600.0
    timeout_s = 120.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        import duckdb

        path = ctx.telemetry_db
        query = ctx.telemetry_query
        if query is None and (path is None or not path.exists()):
            return CheckResult.inconclusive("no telemetry database to check", {"path": str(path)})
        con: Any = None
        tables: dict[str, int] = {}
        try:
            if query is None:
                con = duckdb.connect(str(path), read_only=True)
                query = lambda sql: con.execute(sql).fetchall()  # noqa: E731
            names = query(
                "SELECT schema_name, table_name FROM duckdb_tables() "
                "WHERE database_name = current_database() ORDER BY 1, 2"
            )
            for schema, table in names:
                ident = f'"{schema.replace('"', '""')}"."{table.replace('"', '""')}"'
                # Hashing every column forces every block to be read, and DuckDB checks each
                # block's checksum as it loads it.
                rows = query(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {ident}")  # noqa: S608
                tables[f"{schema}.{table}"] = int(rows[0][0]) if rows else 0
        except duckdb.Error as exc:
            msg = str(exc)
            if "lock" in msg.lower() and "conflicting" in msg.lower():
                return CheckResult.inconclusive(
                    "telemetry database is held by another process", {"path": str(path), "error": msg[:500]}
                )
            return CheckResult.fail(
                "telemetry database is corrupt or unreadable",
                {"path": str(path), "error": msg[:500], "tables_read": tables},
            )
        finally:
            if con is not None:
                con.close()
        rows_total = sum(tables.values())
        evidence = {"path": str(path), "tables": tables}
        return CheckResult.ok(
            f"{len(tables)} table(s), {rows_total} row(s) read back", evidence, rows=rows_total
        )


class AuditChainCheck(Check):
    """Walk the hash-chained audit trail from genesis."""

    name = "integrity.audit_chain"
    description = "the audit trail's hash chain is unbroken"
    severity = Severity.CRITICAL
    interval_s = 3600.0
    timeout_s = 60.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        path = ctx.paths.audit_log
        if not path.exists():
            return CheckResult.inconclusive("no audit trail yet", {"path": str(path)})
        n, brk = AuditLog(path, clock=ctx.clock).verify()
        if brk is not None:
            return CheckResult.fail(
                f"audit chain broken at line {brk.line}: {brk.reason}",
                {"path": str(path), "verified_records": n, "line": brk.line, "reason": brk.reason},
                records=n,
            )
        return CheckResult.ok(f"{n} audit record(s) chain to genesis", {"path": str(path)}, records=n)
