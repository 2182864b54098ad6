"""The scheduler ``xagent.scheduler:scheduler`` (run exactly one per cluster).

``taskiq scheduler xagent.scheduler:scheduler xagent.tasks`` (stop it with SIGINT).
Every schedule has a fixed ``schedule_id``; each send carries a ``scheduled_for`` label
(the tick's time: the minute for cron, the second for intervals) so the tick rows show
whether a tick was delivered once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from taskiq import ScheduledTask, TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource

from xagent import tasks
from xagent.broker import broker


class StampedLabelScheduleSource(LabelScheduleSource):
    """Label schedules, with the tick time added to each message's labels."""

    def pre_send(self, task: ScheduledTask) -> None:
        now = datetime.now(UTC)
        if task.cron is not None:
            tick = now.replace(second=0, microsecond=0)
        else:
            tick = now.replace(microsecond=0)
        task.labels = {**task.labels, tasks.SCHEDULED_FOR_LABEL: tick.isoformat()}


scheduler = TaskiqScheduler(broker=broker, sources=[StampedLabelScheduleSource(broker)])
