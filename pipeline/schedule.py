"""When scheduled jobs run: a cron expression, and a foreground loop that fires on time and catches up.

`Schedule.due(last, now)` is the whole policy: the latest scheduled time in ``(last, now]``, or
nothing. After downtime that skipped several scheduled times, only the latest is run (one catch-up,
not a burst). `run` is the single-machine scheduler: it keeps the last fired time in a small JSON
state file, so a restart neither repeats a run nor forgets one it missed, and sleeps until the next
scheduled time. The clock and the sleep are parameters, so tests drive it on a fake clock.

Cron times are in UTC unless a timezone is given.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from pipeline.errors import ConfigError

__all__ = ["Schedule", "crontab_line", "job_command", "on_calendar", "run", "systemd_units"]


@dataclass(frozen=True)
class Schedule:
    """A cron expression (five fields) in a timezone.

    Raises:
        ConfigError: The expression or the timezone is not valid.

    Example:
        >>> nightly = Schedule("0 2 * * *")
        >>> nightly.next_after(dt.datetime(2026, 11, 20, 3, 0, tzinfo=dt.timezone.utc)).isoformat()
        '2026-11-21T02:00:00+00:00'
    """

    cron: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if len(self.cron.split()) != 5 or not croniter.is_valid(self.cron):
            raise ConfigError(
                f"schedule {self.cron!r} is not a cron expression; give five fields "
                "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *' for 02:00 every night."
            )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone {self.timezone!r} is unknown; use an IANA name like 'Europe/Paris'.") from None

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first scheduled time strictly after `when`."""
        nxt: dt.datetime = croniter(self.cron, when.astimezone(ZoneInfo(self.timezone))).get_next(dt.datetime)
        return nxt

    def due(self, last: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
        """The scheduled time to run now: the latest one in ``(last, now]``, or None.

        With no `last` (a scheduler that never fired), nothing in the past is due.
        """
        latest: dt.datetime = croniter(self.cron, now.astimezone(ZoneInfo(self.timezone))).get_prev(dt.datetime)
        if self.next_after(now - dt.timedelta(seconds=1)) == now:
            latest = now  # `now` is itself a scheduled time (croniter's previous time is strictly before)
        if last is None or latest <= last:
            return None
        return latest


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def run(
    schedule: Schedule,
    fire: Callable[[dt.datetime], None],
    state: Path,
    *,
    clock: Callable[[], dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Fire `fire(scheduled_time)` at each scheduled time until `stop()` is true.

    The last fired time is kept in `state` (JSON). On the first start there is none, and the
    scheduler waits for the next scheduled time; after downtime it fires the latest missed time once.
    """
    saved = json.loads(state.read_text()) if state.exists() else {}
    last = dt.datetime.fromisoformat(saved["last"]) if "last" in saved else None
    if last is None:
        last = clock()
        _save(state, last)
    while not stop():
        now = clock()
        scheduled = schedule.due(last, now)
        if scheduled is not None:
            fire(scheduled)
            last = scheduled
            _save(state, last)
        sleep(max(1.0, (schedule.next_after(now) - now).total_seconds()))


def _save(state: Path, last: dt.datetime) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"last": last.isoformat()}))
    tmp.replace(state)  # atomic: a crash leaves the old state or the new, never half of one


_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def job_command(overrides: list[str], address: str | None, python: str = "python") -> str:
    """The shell command that starts the nightly job: `ray job submit` to a cluster, or the job here."""
    import shlex

    job = [python, "-m", "jobs.nightly", *overrides]
    if address:
        return shlex.join(["ray", "job", "submit", "--address", address, "--", *job])
    return shlex.join(job)


def crontab_line(schedule: Schedule, command: str, workdir: str) -> str:
    """A crontab entry running `command` in `workdir` at the schedule's times."""
    import shlex

    zone = f"CRON_TZ={schedule.timezone}\n"
    # An unescaped % ends a crontab command.
    line = f"cd {shlex.quote(workdir)} && {command} >> tessera-nightly.log 2>&1".replace("%", "\\%")
    return (f"# tessera nightly: {schedule.cron} ({schedule.timezone}); cronie honours CRON_TZ, other crons use the "
            f"system time zone\n{zone}{schedule.cron} {line}\n")


def on_calendar(schedule: Schedule) -> str:
    """The schedule as a systemd OnCalendar= value, for plain fields (numbers, lists and `*`).

    Raises:
        ConfigError: For steps or ranges (*/5, 1-5), which have no one-line translation here.
    """
    minute, hour, day, month, weekday = schedule.cron.split()
    if any(c in field for field in (minute, hour, day, month, weekday) for c in "/-"):
        raise ConfigError(f"schedule {schedule.cron!r} uses steps or ranges; write OnCalendar= by hand "
                          "(man systemd.time), or use `tessera schedule run` or cron.")

    def part(field: str, width: int = 2) -> str:
        return "*" if field == "*" else ",".join(f"{int(v):0{width}d}" for v in field.split(","))

    days = "" if weekday == "*" else ",".join(_DAYS[int(d)] for d in weekday.split(",")) + " "
    return f"{days}*-{part(month)}-{part(day)} {part(hour)}:{part(minute)}:00 {schedule.timezone}"


def systemd_units(schedule: Schedule, command: str, workdir: str) -> dict[str, str]:
    """A oneshot service running `command` in `workdir`, and the timer that starts it on schedule.

    `command` is a shell-quoted word list (as `job_command` makes), which systemd's ExecStart= parses
    with the same quoting; it starts with an absolute interpreter path, as systemd requires.
    """
    return {
        "tessera-nightly.service": (
            "[Unit]\nDescription=tessera nightly training\nWants=network-online.target\n"
            "After=network-online.target\n\n[Service]\nType=oneshot\n"
            f"WorkingDirectory={workdir}\nExecStart={command.replace('%', '%%')}\n"
        ),
        "tessera-nightly.timer": (
            "[Unit]\nDescription=tessera nightly training schedule\n\n[Timer]\n"
            f"OnCalendar={on_calendar(schedule)}\n"
            "Persistent=true\n\n[Install]\nWantedBy=timers.target\n"
        ),
    }
