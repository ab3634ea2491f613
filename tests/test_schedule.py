"""The scheduler: which scheduled time is due, firing on a fake clock, catching up once after downtime."""

from __future__ import annotations

import datetime as dt
import json
import sys
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


# The front doors: crontab and systemd text, Kubernetes manifests


def test_crontab_and_systemd_text_start_the_nightly_job_on_schedule(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.schedule import crontab_line, on_calendar, systemd_units

    cron = CliRunner().invoke(app, ["schedule", "crontab", "--address", "http://head:8265", "margin=0.05"])
    assert cron.exit_code == 0, cron.output
    entry = [line for line in cron.output.splitlines() if line.startswith("0 2 ")]
    assert "CRON_TZ=UTC" in cron.output.splitlines()
    assert entry == [f"0 2 * * * cd {Path.cwd()} && ray job submit --address http://head:8265 -- python -m "
                     "jobs.nightly margin=0.05 >> tessera-nightly.log 2>&1"]
    units = CliRunner().invoke(app, ["schedule", "systemd", "schedule.timezone=Europe/Paris"])
    assert units.exit_code == 0, units.output
    assert "OnCalendar=*-*-* 02:00:00 Europe/Paris" in units.output and "Persistent=true" in units.output
    assert f"ExecStart={sys.executable} -m jobs.nightly schedule.timezone=Europe/Paris\n" in units.output
    assert crontab_line(Schedule("0 2 * * *"), "echo 50%", "/w").endswith("echo 50\\% >> tessera-nightly.log 2>&1\n")
    assert "ExecStart=echo 50%%" in systemd_units(Schedule("0 2 * * *"), "echo 50%", "/w")["tessera-nightly.service"]
    assert on_calendar(Schedule("30 1 * * 1,3")) == "Mon,Wed *-*-* 01:30:00 UTC"
    with pytest.raises(ConfigError, match="steps or ranges"):
        on_calendar(Schedule("*/5 * * * *"))
    bad = CliRunner().invoke(app, ["schedule", "crontab", "schedule.cron=nightly"])
    assert bad.exit_code == 2 and "not a cron expression" in bad.output


@pytest.mark.parametrize("name", ["raycronjob-nightly.yaml", "cronjob-nightly.yaml"])
def test_kubernetes_manifests_parse_and_run_the_nightly_entry_point(name: str) -> None:
    import shlex

    import yaml

    from jobs.nightly import to_config
    from pipeline.cli import compose

    text = (Path(__file__).resolve().parents[1] / "conf" / "k8s" / name).read_text()
    documents = list(yaml.safe_load_all(text))
    first = documents[0]
    assert Schedule(first["spec"]["schedule"], first["spec"]["timeZone"]).cron == "0 2 * * *"
    if first["kind"] == "RayCronJob":
        rayjob = first["spec"]["jobTemplate"]
    else:
        assert first["kind"] == "CronJob" and "kubectl create" in str(first["spec"]["jobTemplate"])
        template = next(d for d in documents if d["kind"] == "ConfigMap")["data"]["rayjob.yaml"]
        rayjob = yaml.safe_load(template.replace("NIGHT", "2026-11-22"))
        assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["name"] == "tessera-nightly-2026-11-22"
        rayjob = rayjob["spec"]
    words = shlex.split(rayjob["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.nightly"]
    # The overrides are valid for the nightly job's config.
    config = to_config(compose("nightly", words[3:]))
    assert config.train.catalog == "/data/catalog.yaml" and config.distributed is not None
    assert config.distributed.device == "cuda" and config.distributed.workers == 4
