"""Every entry point honours --help: it prints its usage and exits 0, and starts nothing (no process,
no listening socket, no Ray). The modules are found by their `if __name__ == "__main__":`, so a new one
is checked without being listed here."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import runpy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
MAIN = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
USAGE = re.compile(r"usage:|Powered by Hydra", re.IGNORECASE)  # argparse and Typer, Hydra


def main_modules() -> list[str]:
    """The modules under bench/, jobs/ and pipeline/ that run as `python -m NAME`."""
    names = []
    for path in sorted([*REPO.glob("bench/**/*.py"), *REPO.glob("jobs/**/*.py"), *REPO.glob("pipeline/**/*.py")]):
        if "node_modules" not in path.parts and MAIN.search(path.read_text()):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return names


MODULES = main_modules()


def test_the_entry_points_are_found() -> None:
    assert {"bench", "bench.query", "jobs.segment", "jobs.train", "jobs.nightly", "jobs.refine",
            "pipeline.cli"} <= set(MODULES), MODULES


class Started(AssertionError):
    """--help tried to start something."""


@contextlib.contextmanager
def nothing_starts() -> Iterator[None]:
    """Starting a process, listening on a socket or starting Ray fails loudly inside this block."""
    import multiprocessing.process

    import ray

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise Started(f"--help started {what}: {args[:2]}")
        return refused

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    ray_before = ray.is_initialized()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(subprocess, "Popen", refuse("a process"))
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("a process"))
        monkeypatch.setattr(socket.socket, "listen", refuse("a server"))
        monkeypatch.setattr(ray, "init", refuse("Ray"))
        yield
    assert ray.is_initialized() == ray_before  # an earlier test's session Ray may already run in this process
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


@pytest.fixture
def fresh_hydra() -> Iterator[None]:
    """Hydra's --help leaves its global state set, which a later `initialize_config_dir` refuses, and
    configures logging (the jobs' `disabled` logging: root at ERROR, every existing logger disabled),
    which would hide later tests' warnings from caplog: both are put back."""
    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    level = root.level
    loggers = {name: (logger.disabled, logger.level) for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    yield
    GlobalHydra.instance().clear()
    root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.disabled, was = loggers.get(name, (False, logging.NOTSET))
            logger.setLevel(was)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")  # imported first
def test_help_prints_usage_and_starts_nothing(module: str, fresh_hydra: None, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Imported first, unguarded: what its imports do once (ctypes asking ldconfig) is not --help's doing.
    importlib.import_module(f"{module}.__main__" if (REPO / module.replace(".", "/")).is_dir() else module)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with nothing_starts(), pytest.raises(SystemExit) as exit:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit.value.code in (0, None), out
    assert USAGE.search(out), out


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand of the tessera CLI, as the words that name it."""
    yield path
    if isinstance(group, TyperGroup):
        for name, command in group.commands.items():
            yield from commands(command, (*path, name))


COMMANDS = list(commands(typer.main.get_command(app)))


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(("tessera", *words)))
def test_each_tessera_command_prints_its_help_and_starts_nothing(words: tuple[str, ...]) -> None:
    with nothing_starts():
        result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_the_hydra_commands_name_their_config_and_how_to_override() -> None:
    for command, config in (("train", "pipeline/conf/train.yaml"), ("nightly", "pipeline/conf/nightly.yaml")):
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert config in out and "KEY=VALUE" in out and f"python -m jobs.{command} --help" in out, out


def watched(args: list[str]) -> tuple[int, str]:
    """Run `args` to the end: its exit code and output. Fails, stopping it and all it started, as soon
    as it is seen (sampled every 20 ms) to start a process or listen on a port."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = psutil.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: set[str] = set()
    listened: set[int] = set()
    deadline = time.monotonic() + 60  # a hang guard, not a timing check
    while process.poll() is None:
        try:
            started |= {" ".join(p.cmdline()[:3]) for p in process.children(recursive=True)}
            listened |= {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        if started or listened or time.monotonic() > deadline:  # stop all of it now, not just the root
            for stray in [*process.children(recursive=True), process]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    stray.kill()
            pytest.fail(f"{' '.join(args)} started processes {started} and listened on ports {listened}, "
                        "or ran over 60 s")
        time.sleep(0.02)
    out = process.stdout.read() if process.stdout else ""
    return process.returncode, out


TESSERA = str(Path(sys.executable).parent / "tessera")


@pytest.mark.parametrize("args", [
    [sys.executable, "-m", "bench", "--help"],
    [TESSERA, "--help"],
    [TESSERA, "train", "--help"],
    [TESSERA, "nightly", "--help"],
    [sys.executable, "-m", "jobs.refine", "--help"],
], ids=lambda args: " ".join(a for a in args[1:] if a != "-m"))
def test_help_in_its_own_process_starts_no_process_and_no_server(args: list[str]) -> None:
    code, out = watched(args)
    assert code == 0 and USAGE.search(out), out
