"""The ``broker`` and ``worker`` command lines (click) and the launcher's process handling, without
a model: help that never imports torch, errors that name the flag and the value, children that
are always stopped."""
from __future__ import annotations

import subprocess
import sys

import pytest

from broker import cli as broker_cli
from broker.launch import Children, read_line, wait_for_workers
from tests.harness import ROOT, _env
from workers import cli as worker_cli

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("argv,needles", [
    (["workers.cli", "--help"], ["start"]),
    (["workers.cli", "start", "--help"], ["--extra-llm-api-options", "--extra_llm_api_options", "--role",
                                          "--exit-with-parent", "(default: smollm2-135m)"]),
    (["broker.cli", "--help"], ["start", "launch"]),
    (["broker.cli", "start", "--help"], ["--frontend", "--heartbeat-interval", "--no-http", "(default 3)"]),
    (["broker.cli", "launch", "--help"], ["--config", "--demo", "--prompt", "--ready-timeout", "(default: 48)"]),
])
def test_help_lists_the_options_and_never_imports_torch(argv, needles):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stdout, (needle, proc.stdout)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "click" in imported                  # the -X importtime listing is really there
    assert "torch" not in imported


@pytest.mark.parametrize("main,argv,needles", [
    (worker_cli.main, ["start", "--role", "decoder", "--broker", "tcp://x:1"], ["--role", "'decoder'"]),
    (worker_cli.main, ["start", "--role", "context"], ["--broker"]),
    (broker_cli.main, ["start", "--liveness", "often"], ["--liveness", "'often'"]),
    (broker_cli.main, ["start", "--log-level", "LOUD"], ["--log-level", "'LOUD'"]),
    (broker_cli.main, ["launch", "--max-tokens", "many", "-c", "x.yaml"], ["--max-tokens", "'many'"]),
    (broker_cli.main, ["serve"], ["'serve'"]),
    # a pid <= 0 is a process group to os.kill (0: our own): never signalled, named as bad
    (worker_cli.main, ["drain", "--pid", "-999999"], ["--pid", "-999999", "x>=1"]),
    (worker_cli.main, ["drain", "--pid", "0"], ["--pid", "0", "x>=1"]),
    (worker_cli.main, ["drain", "--worker-id", "x", "--broker", "tcp://127.0.0.1:1", "--timeout", "-1"],
     ["--timeout", "-1", "x>0"]),
])
def test_bad_flags_and_values_are_named(main, argv, needles, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_both_option_spellings_reach_the_worker():
    for flag in ("--extra-llm-api-options", "--extra_llm_api_options"):
        params = worker_cli.start.make_context("start", ["--role", "both", "--broker", "tcp://x:1",
                                                         flag, "w.yaml"]).params
        assert params["options"] == "w.yaml" and params["model"] == "smollm2-135m"


def test_config_errors_are_reported_as_prog_error_with_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert broker_cli.main(["start", "--no-http", "-c", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("broker: error:") and missing in err
    bad = tmp_path / "w.yaml"
    bad.write_text("max_batch_size: 0\n")
    assert worker_cli.main(["start", "--role", "context", "--broker", "tcp://x:1",
                            "--extra_llm_api_options", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worker: error:") and str(bad) in err and "max_batch_size" in err


# ---------------------------------------------------------------------------------------------
# the launcher's children

def _python(code: str) -> list:
    return [sys.executable, "-c", code]


def test_close_stops_gracefully_then_kills_what_ignores_sigterm():
    children = Children(prefix="test-cli-")
    try:
        polite = children.start("polite", _python("import time; print('ready', flush=True); time.sleep(60)"),
                                stdout=subprocess.PIPE)
        stubborn = children.start("stubborn", _python(
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)"), stdout=subprocess.PIPE)
        assert read_line(polite, 30, "ready line") == "ready"
        assert read_line(stubborn, 30, "ready line") == "ready"
    finally:
        children.close(grace=1.0)
    assert polite.returncode == -15 and stubborn.returncode == -9
    assert children.procs == []


def test_a_child_dying_while_we_wait_fails_the_wait_with_its_log(tmp_path):
    with Children(prefix="test-cli-") as children:
        children.start("context-0", _python("import sys; print('no model here', file=sys.stderr); sys.exit(3)"))
        with pytest.raises(RuntimeError) as e:
            # nothing listens there: the wait can end only through the child's death (or its deadline)
            wait_for_workers(f"ipc://{tmp_path}/no-broker", {"context": 1}, 60, children)
    assert "context-0" in str(e.value) and "exited with code 3" in str(e.value)
    assert "no model here" in str(e.value)


def test_wait_for_workers_times_out_naming_what_it_waited_for(tmp_path):
    with pytest.raises(TimeoutError, match="context 1"):
        wait_for_workers(f"ipc://{tmp_path}/no-broker", {"context": 1}, 0.5)
