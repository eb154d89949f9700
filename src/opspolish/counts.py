"""Summary counts: what one attempt of a run reports about its items (DESIGN §1: total / processed / failed).

Only the final attempt's counts reach ``summary_counts``: a retried run overwrites them, never adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: The largest count ``summary_counts`` holds (the ledger's CHECK reads each as at most 18 digits).
MAX_COUNT = 10**18 - 1
#: Detail counts (``bump``) one run may keep beside the main three, and the longest name one may have.
MAX_DETAIL_COUNTS = 100
MAX_DETAIL_NAME = 100


class Counts:
    """Item counts of one attempt. Only the final attempt's counts reach ``summary_counts``.

    The counts move only through the methods below, which check every step: ``total``, ``processed``, ``failed`` and
    ``extra`` are read-only. Assigned directly (``run.counts.failed = -1``, ``extra["x"] = "5"``), they reached the
    completion unchecked: the ledger refused it, the fallback write repeated the same counts, and the run was left
    ``running`` until reconcile called it orphaned. Such an assignment now raises in the body instead.
    """

    __slots__ = ("_extra", "_failed", "_processed", "_total")

    def __init__(self) -> None:
        self._total = 0
        self._processed = 0
        self._failed = 0
        self._extra: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self._total

    @property
    def processed(self) -> int:
        return self._processed

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def extra(self) -> Mapping[str, int]:
        """The detail counts (``bump``), read-only."""
        return MappingProxyType(self._extra)

    def __repr__(self) -> str:
        return f"Counts({self.as_dict()!r})"

    def add_total(self, n: int = 1) -> None:
        self._total = self._moved("total", self._total, n)

    def item_succeeded(self, n: int = 1) -> None:
        self._processed = self._moved("processed", self._processed, n)

    def item_failed(self, n: int = 1) -> None:
        processed = self._moved("processed", self._processed, n)
        self._failed = self._moved("failed", self._failed, n)
        self._processed = processed

    def bump(self, key: str, n: int = 1) -> None:
        """A detail count (``requeued``, ``orphaned``...) stored beside the three main ones."""
        if not isinstance(key, str) or key in ("total", "processed", "failed"):
            # Stored beside the main counts, such a key would be overwritten by them and silently lost.
            raise ValueError(f"counts: bump({key!r}): a detail count needs a name of its own; total, processed and "
                             "failed move through add_total, item_succeeded and item_failed")
        if key not in self._extra:
            self._check_new_detail(key)
        self._extra[key] = self._moved(key, self._extra.get(key, 0), n)

    def _check_new_detail(self, key: str) -> None:
        """A name the ledger's jsonb can hold (no NUL, valid UTF-8), of a sane length and number: the completion
        would otherwise be refused after the body ran."""
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"counts: bump({key!r}): the name is not valid UTF-8") from None
        if not key or "\x00" in key or len(key) > MAX_DETAIL_NAME:
            raise ValueError(f"counts: bump({key[:MAX_DETAIL_NAME]!r}): a name of 1 to {MAX_DETAIL_NAME} characters "
                             "with no NUL")
        if len(self._extra) >= MAX_DETAIL_COUNTS:
            raise ValueError(f"counts: bump({key!r}): at most {MAX_DETAIL_COUNTS} detail counts per run")

    @staticmethod
    def _moved(name: str, value: int, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"counts move by non-negative integers, got {n!r}")
        if value + n > MAX_COUNT:  # the ledger's CHECK refuses it: the completion would fail and the run hang
            raise ValueError(f"counts: {name} would exceed {MAX_COUNT}, the most summary_counts can hold")
        return value + n

    def as_dict(self) -> dict[str, int]:
        # An item processed beyond the announced total still counts: total never trails processed.
        return {**self._extra, "total": max(self._total, self._processed), "processed": self._processed,
                "failed": self._failed}
