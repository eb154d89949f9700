"""``arq tests.support.workers.WorkerSettings``: a worker process with the built-in and test jobs
(OPSPOLISH_JOB_MODULES=tests.support.jobs, set by the tests). Settings come from the environment."""

from __future__ import annotations

import asyncio
from typing import Any

from opspolish.worker import worker_settings

WorkerSettings = worker_settings(with_cron=False)


#: How long ``HeldStartWorkerSettings`` holds each delivery in arq's ``on_job_start``, before its job starts.
JOB_START_HOLD_S = 3.0


async def _hold_job_start(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(JOB_START_HOLD_S)


#: The same worker, whose deliveries wait in ``on_job_start``: arq's ``run_job`` is then outside the ``try`` that takes
#: a job's cancellation, where a SIGTERM also finds a delivery arq has just created or is still reading from Redis.
HeldStartWorkerSettings = type("HeldStartWorkerSettings", (), {  # arq reads the class's own __dict__: no subclass
    **{k: v for k, v in vars(WorkerSettings).items() if not k.startswith("__")}, "on_job_start": _hold_job_start})
