"""Built-in job types. Importing this package registers them."""

from opspolish.jobs import assignments, reconcile

__all__ = ["assignments", "reconcile"]
