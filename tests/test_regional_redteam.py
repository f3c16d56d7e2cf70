"""Red team of the regional tier: trust must stay end to end through a compromised regional hub.

Written before any regional implementation existed (issue 19), from the device and root-hub code only.
The threat: whatever sits between the root hub and a device (a regional hub at a site, a mirror, the
site's network) is under the attacker's control. It holds no signing key of the root (root, targets,
channel roles, online snapshot/timestamp keys), no device key and no operator key; it may hold every
byte that ever passed through it, edit its own disk, answer devices and the root however it likes, and
hold, drop, duplicate and reorder traffic. It may also be an *enrolled* party at the root (a regional
identity, or a stolen device key of its own site), so its own signature must never stand in for a
device's or an operator's.

Outcomes, from outside only (slots, the device's audit trail and held record, the root's lake rows,
receipts, reported/attested state, rollout counters and ``fleet status``):

- REFUSED-DEVICE: the device refuses (``pull.refused`` or ``escalation.*_refused`` audited), installs
  nothing, keeps serving what it served, and its held record is unchanged.
- REFUSED-ROOT: the root answers 4xx and nothing lands (no receipt, no lake row, no state change).
- DETECTABLE: the attack cannot be prevented by signatures alone (withholding), but it is bounded and
  visible at the root: the device's signed report shows it behind (drift), its sync age grows, or the
  freeze ends at the signed expiry of what the tier replays.

Down the tier (the signed repository, desired state, recalls, approvals)

====  ===========================================================  ===================================
id    attack                                                        expected
====  ===========================================================  ===================================
D1    timestamp.json altered (version/expiry/hashes edited, the     REFUSED-DEVICE (signature)
      signature kept)
D2    snapshot altered (a role's version bumped, signature kept)    REFUSED-DEVICE
D3    channel targets role altered: a target's hash and length      REFUSED-DEVICE
      swapped for the tier's own artifact
D4    desired-state.json swapped for another signed version's       REFUSED-DEVICE (hash mismatch)
      bytes (the baseline instead of the release) or edited
D5    far future: x-sre-issued edited to a time years ahead so a    REFUSED-DEVICE; trusted time
      later replay looks fresh                                      (clock.json) does not move
D6    rollback: the whole older, validly signed repository served   REFUSED-DEVICE (version went back)
      to a device that saw the newer one
D7    freeze: an old complete repository copy served (304 to every  DETECTABLE: the device's report
      poll, or old bytes) so a new release / a recall never         shows drift at the root; at the
      arrives                                                       replayed timestamp's expiry the
                                                                    device refuses it (expired)
D8    swapped roles: the beta channel's signed role served as the   REFUSED-DEVICE
      stable role (valid signature, wrong role)
D9    target bytes altered, truncated, or swapped for another       REFUSED-DEVICE; CAS clean, no
      signed version's bytes                                        partial, slots unchanged
D10   recalled version: after a recall, the tier replays the        REFUSED-DEVICE for a device that saw
      pre-recall repository (names the withdrawn version)           the recall; a fresh device only until
                                                                    the replayed timestamp expires;
                                                                    root shows the drift
D11   on-disk edits of a regional mirror (metadata, targets,        same as D1-D9: nothing is re-signed,
      partial files) served to devices                              so every edit is caught
A1    approval altered on the way down: the action changed to a     REFUSED-DEVICE (signature);
      more severe one                                               escalation stays open, nothing runs
A2    a valid approval for another device's escalation delivered    REFUSED-DEVICE (bound to the other
      to this device (renamed to this escalation's id)              escalation's id and content hash)
A3    an old approval replayed after it was executed                REFUSED-DEVICE (audit trail), the
                                                                    action ran exactly once
A4    an approval held back until it expired, then delivered        REFUSED-DEVICE (expired)
A5    an approval forged with the tier's own key (not in the        REFUSED-DEVICE (unknown operator /
      signed operator roster)                                       signature)
====  ===========================================================  ===================================

Up the tier (device batches, reports, attestations, escalations)

====  ===========================================================  ===================================
U1    batch body altered (rows edited), device headers kept         REFUSED-ROOT (forged digest)
U2    batch re-signed by the tier's own enrolled key (rows of       REFUSED-ROOT (rows not of the
      another device)                                               signer); nothing lands
U3    batch acknowledged to the device ("stored") but never         DETECTABLE: the batch stays
      forwarded                                                     recoverable (the device keeps it
                                                                    until the root has it, or the root
                                                                    sees the gap)
U4    batch duplicated (sent twice, and replayed later)             lands exactly once (duplicate /
                                                                    replayed)
U5    batches reordered                                             every batch lands exactly once
U6    report altered (failed -> healthy on the candidate, or a      REFUSED-ROOT; rollout counters and
      withdrawn version hidden)                                     the stored report unchanged
U7    reports reordered: an older, validly signed report (healthy)  the root keeps the newest report by
      delivered after the newer one (rolled back) to hide a         the device's signed time: the
      failure from the halt rule                                    failure still counts
U8    attestation altered, or an older attestation replayed after   REFUSED-ROOT / ignored: the attested
      a newer one                                                   state stays the newest genuine one
U9    another device's attestation wrapped in the tier's own        REFUSED-ROOT
      signed request
S1    the tier lies about site sync (claims in sync while it        DETECTABLE: the root's view is built
      serves a frozen repository)                                   from device-signed reports (drift,
                                                                    serial) and the root's own records
                                                                    of the site, never the tier's claim
====  ===========================================================  ===================================

The hostile tier of the first part needs no regional implementation: :class:`HostileTier`
(tests/regional_attack_support.py) is a loopback HTTP relay in front of a real root hub (TUF repository,
fleet API, ingest) that applies each tampering; devices are real (Puller, Reconciler, file-mode slots,
telemetry Store + Uplink, send_report, EscalationStore).
"""
