"""``arq tests.support.workers.WorkerSettings``: a worker process with the built-in and test jobs
(OPSPOLISH_JOB_MODULES=tests.support.jobs, set by the tests). Settings come from the environment."""

from __future__ import annotations

from opspolish.worker import worker_settings

WorkerSettings = worker_settings(with_cron=False)
