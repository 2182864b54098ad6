"""``taskiq scheduler pinboard.scheduler:scheduler pinboard.tasks``: one process per app."""

from taskiq import TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource

from pinboard.broker import broker

scheduler = TaskiqScheduler(broker, [LabelScheduleSource(broker)])
