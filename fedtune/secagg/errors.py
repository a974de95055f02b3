"""The typed failures of secure aggregation, so a runtime can tell a dropped round from a bug or an attack."""

from __future__ import annotations

from fedtune.wire.codec import PayloadError


class SecAggError(Exception):
    """A secure-aggregation step cannot go on: a peer's message is inconsistent, forged or replayed."""


class SecAggAbort(SecAggError):  # noqa: N818 (an abort is an outcome, not a bug)
    """The round ends without a sum: too few clients survived a stage (or reconstruction failed).

    ``reason`` says which stage and how many were left, so the runtime can log it and sample again.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SecAggStageError(SecAggError):
    """A stage was called out of order (e.g. ``collect_masked`` before ``collect_shares``)."""


class ShareDecryptionError(SecAggError):
    """An encrypted share did not open: it is forged, corrupted, or replayed from another round or pair.

    ``sender`` names the node the ciphertext claims to come from.
    """

    def __init__(self, sender: int, detail: str) -> None:
        super().__init__(f"the share ciphertext from node {sender} does not open: {detail}")
        self.sender = sender


class SecAggPayloadError(PayloadError):
    """Received bytes are not a valid secure-aggregation message (a :class:`ValueError`)."""
