"""The one place that reaches into python-tuf's private members.

Public API::

    DurableUpdater(metadata_dir, metadata_base_url, fetcher, config, bootstrap=None, admit=None)
        an ngclient ``Updater`` that persists with fsync and lets ``admit(role, data)`` refuse a
        verified metadata file *before* it is written (raise a ``RepositoryError``)
    set_reference_time(updater, when)   every expiry check of the updater's next refresh uses ``when``
    check_private_api()                 raise ``TufApiChangedError`` when python-tuf changed the members
                                        this module relies on (a test calls it: an upgrade fails loudly)
    Admit = Callable[[str, bytes], None]

Why the private members: python-tuf persists metadata with a rename but no fsync (on flash a power cut
can leave an empty file under the final name), and it checks expiry against its own
``datetime.now()``, while the device must use trusted time (a clock wound back must not revive expired
metadata). python-tuf offers no public hook for either, so ``Updater._persist_file`` is overridden and
``Updater._trusted_set.reference_time`` is set; both are checked by :func:`check_private_api`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.fetcher import FetcherInterface

from sre_core.atomic import atomic_write_bytes

__all__ = ["Admit", "DurableUpdater", "TufApiChangedError", "check_private_api", "set_reference_time"]

Admit = Callable[[str, bytes], None]
"""(role file name, e.g. ``timestamp.json``; the verified bytes) -> None, or raise to refuse."""


class TufApiChangedError(RuntimeError):
    """python-tuf no longer has a private member this adapter relies on: review the adapter."""


class DurableUpdater(Updater):
    """An ngclient ``Updater`` that fsyncs what it persists and can refuse verified metadata.

    Args:
        metadata_dir: python-tuf's local metadata cache.
        metadata_base_url: where metadata is fetched from.
        fetcher: the network (or bundle) seam.
        config: python-tuf's bounds.
        bootstrap: the pinned root bytes (None: start from the cached root).
        admit: called with each verified metadata file before it is persisted; raising refuses it
            (python-tuf then leaves the refresh, and nothing of that file is written).
    """

    def __init__(
        self,
        metadata_dir: str,
        metadata_base_url: str,
        fetcher: FetcherInterface,
        config: UpdaterConfig,
        bootstrap: bytes | None = None,
        admit: Admit | None = None,
    ) -> None:
        self._admit = admit
        super().__init__(
            metadata_dir, metadata_base_url, None, None, fetcher=fetcher, config=config, bootstrap=bootstrap
        )

    def _persist_file(self, filename: str, data: bytes) -> None:
        if self._admit is not None:
            self._admit(Path(filename).name, data)
        atomic_write_bytes(Path(filename), data)


def set_reference_time(updater: Updater, when: datetime) -> None:
    """Make every expiry check of ``updater`` use ``when`` (trusted time) instead of the system clock."""
    if when.tzinfo is None:
        raise ValueError("reference time must be timezone-aware")
    updater._trusted_set.reference_time = when


def check_private_api() -> None:
    """Fail loudly when python-tuf changed what this module overrides or sets.

    Raises:
        TufApiChangedError: ``Updater._persist_file(filename, data)`` or the trusted set's
            ``reference_time`` (read by its expiry checks) is gone or changed shape.
    """
    method = getattr(Updater, "_persist_file", None)
    if method is None:
        raise TufApiChangedError("tuf.ngclient.Updater._persist_file is gone: metadata would not be fsynced")
    params = list(inspect.signature(method).parameters)
    if params != ["self", "filename", "data"]:
        raise TufApiChangedError(f"Updater._persist_file now takes {params}, not (self, filename, data)")
    for caller in ("_persist_metadata", "_persist_root"):
        if "_persist_file" not in inspect.getsource(getattr(Updater, caller)):
            raise TufApiChangedError(f"Updater.{caller} no longer persists through _persist_file")
    init_src = inspect.getsource(TrustedMetadataSet.__init__)
    if "self.reference_time" not in init_src:
        raise TufApiChangedError("TrustedMetadataSet no longer has reference_time")
    body = inspect.getsource(TrustedMetadataSet)
    if body.count("is_expired(self.reference_time)") < 4:
        raise TufApiChangedError(
            "TrustedMetadataSet no longer checks root, timestamp, snapshot and targets expiry against "
            "reference_time: trusted time would not apply"
        )
    if "_trusted_set" not in inspect.getsource(Updater.__init__):
        raise TufApiChangedError("Updater no longer keeps its TrustedMetadataSet in _trusted_set")
