"""``arq tests.support.workers.WorkerSettings``: a worker process with the built-in and test jobs.

Settings come from the environment, as for the real worker."""

from __future__ import annotations

import opspolish.jobs
from opspolish.settings import Settings
from opspolish.tracking import REGISTRY
from opspolish.worker import worker_settings
from tests.support import jobs as _test_jobs

assert opspolish.jobs and _test_jobs
WorkerSettings = worker_settings(Settings(), jobs=list(REGISTRY.values()), with_cron=False)
