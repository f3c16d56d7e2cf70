"""The desired-state checks as a pure verifier: values in, a verified :class:`DesiredState` or an error out.

Public API::

    HeldFacts(channel, anchor, serial, desired_sha256)   what the device holds (from ``held.json``)
    HeldFacts.from_record(record) -> HeldFacts | None
    verify_desired_state(data, sha256, channel, anchor, held, signed_time_limit) -> DesiredState
    DesiredStateError(SreError)                          the document is refused (bad remote data)
    FutureIssuedError(DesiredStateError)                 ... because it claims a signing time too far ahead

Like python-tuf's trusted metadata set this does no I/O and reads no clock: the caller downloads the
TUF-verified bytes, passes the facts it holds and the latest admissible signed time
(:func:`deployment.trusted_time.signed_time_bound`), and persists only what comes back.

Checks, in order: well-formed, for this channel, serial never goes back under the same trust anchor,
the same serial never carries different content (replay), the signing time is not beyond the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from deployment.manifest import DesiredState
from sre_core.errors import SreError

__all__ = ["DesiredStateError", "FutureIssuedError", "HeldFacts", "verify_desired_state"]


class DesiredStateError(SreError):
    """The signed desired state is refused; nothing of it may be persisted or acted on."""


class FutureIssuedError(DesiredStateError):
    """The desired state claims a signing time beyond the admissible bound."""


@dataclass(frozen=True)
class HeldFacts:
    """The facts of the desired state the device holds, that a new one is judged against."""

    channel: str
    anchor: str
    serial: int
    desired_sha256: str

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> HeldFacts | None:
        """From a ``held.json`` record (None when there is none or it lacks the facts)."""
        if not record:
            return None
        try:
            return cls(
                str(record.get("channel", "")),
                str(record.get("anchor", "")),
                int(record["serial"]),
                str(record.get("desired_sha256", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def verify_desired_state(
    data: bytes,
    sha256: str,
    channel: str,
    anchor: str,
    held: HeldFacts | None,
    signed_time_limit: datetime,
) -> DesiredState:
    """Verify a TUF-verified desired-state document against what the device holds.

    Args:
        data: the document (its length and sha256 were already verified against signed metadata).
        sha256: its signed digest.
        channel: the device's channel.
        anchor: sha256 of the pinned trust anchor (serials only compare under one anchor).
        held: the held desired state's facts, or None.
        signed_time_limit: the latest admissible signing time.

    Raises:
        DesiredStateError: malformed, another channel, a rolled-back or replayed serial, or signed
            beyond the limit.
    """
    what = f"desired state {channel}"
    try:
        desired = DesiredState.model_validate_json(data)
    except ValidationError as exc:
        raise DesiredStateError(
            what, f"signed but malformed: {exc.errors()[0]['msg']}", "report the hub"
        ) from exc
    if desired.channel != channel:
        raise DesiredStateError(what, f"it is for channel {desired.channel}, not {channel}", "report the hub")
    if held is not None and held.channel == channel and held.anchor == anchor:
        if desired.serial < held.serial:
            raise DesiredStateError(
                what,
                f"serial {desired.serial} is older than the held serial {held.serial} (rollback)",
                "nothing was installed; the source replays an old desired state: report it",
            )
        if desired.serial == held.serial and sha256 != held.desired_sha256:
            raise DesiredStateError(
                what,
                f"serial {desired.serial} is held with different content (replayed serial)",
                "report the hub: each release must increase the serial",
            )
    if desired.issued > signed_time_limit:
        raise FutureIssuedError(
            what,
            f"serial {desired.serial} claims it was issued at {desired.issued.isoformat()}, beyond the "
            f"device clock plus the tolerance ({signed_time_limit.isoformat()})",
            "nothing was installed and trusted time is unchanged; the channel key or the hub clock is "
            "wrong: re-sign with a correct clock (rotate the key if it was stolen)",
        )
    return desired
