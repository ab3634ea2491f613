"""The scheduler: which scheduled time is due, firing on a fake clock, catching up once after downtime."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.schedule import Schedule, run

UTC = dt.timezone.utc
NIGHTLY = Schedule("0 2 * * *")


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


class FakeClock:
    """Time that moves only when the scheduler sleeps; stops the loop at `until`."""

    def __init__(self, start: dt.datetime, until: dt.datetime) -> None:
        self.now, self.until, self.sleeps = start, until, 0

    def __call__(self) -> dt.datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self.sleeps += 1

    def stop(self) -> bool:
        return self.now > self.until


def test_due_is_the_latest_scheduled_time_since_the_last_run() -> None:
    assert NIGHTLY.due(None, at(21, 3)) is None  # never fired: nothing in the past is due
    assert NIGHTLY.due(at(20, 2), at(20, 23)) is None  # already ran tonight
    assert NIGHTLY.due(at(20, 2), at(21, 2)) == at(21, 2)  # exactly on time
    assert NIGHTLY.due(at(20, 2), at(21, 2, 1)) == at(21, 2)
    assert NIGHTLY.due(at(18, 2), at(21, 9)) == at(21, 2)  # three nights missed: only the latest


def test_run_fires_at_each_scheduled_time_on_a_fake_clock(tmp_path: Path) -> None:
    clock, fired = FakeClock(at(20, 1), until=at(23, 3)), []
    run(NIGHTLY, fired.append, tmp_path / "state.json", clock=clock, sleep=clock.sleep, stop=clock.stop)
    assert fired == [at(20, 2), at(21, 2), at(22, 2), at(23, 2)]
    assert clock.sleeps <= 6  # it sleeps until the next time, it does not poll
    assert json.loads((tmp_path / "state.json").read_text())["last"] == at(23, 2).isoformat()


def test_after_downtime_one_missed_run_is_caught_up_then_the_schedule_resumes(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"last": at(20, 2).isoformat()}))  # then the machine was off for 3 nights
    clock, fired = FakeClock(at(23, 12), until=at(25, 3)), []
    run(NIGHTLY, fired.append, state, clock=clock, sleep=clock.sleep, stop=clock.stop)
    assert fired == [at(23, 2), at(24, 2), at(25, 2)]


def test_first_start_fires_nothing_from_the_past(tmp_path: Path) -> None:
    clock, fired = FakeClock(at(20, 9), until=at(20, 23)), []
    run(NIGHTLY, fired.append, tmp_path / "state.json", clock=clock, sleep=clock.sleep, stop=clock.stop)
    assert fired == []


def test_timezones_and_bad_expressions() -> None:
    paris = Schedule("0 2 * * *", timezone="Europe/Paris")  # 02:00 in Paris is 01:00 UTC in November
    assert paris.next_after(at(20, 0)).astimezone(UTC) == at(20, 1)
    with pytest.raises(ConfigError, match="five fields"):
        Schedule("0 2 * *")
    with pytest.raises(ConfigError, match="five fields"):
        Schedule("61 2 * * *")
    with pytest.raises(ConfigError, match="IANA"):
        Schedule("0 2 * * *", timezone="Mars/Olympus")
