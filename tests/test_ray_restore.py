"""Ray's own Tuner.restore after the driver is killed (SIGKILL), with an SQLite-backed OptunaSearch.

This is why the search keeps its own journal and resumes from it (tuning/journal.py) instead of
calling Tuner.restore. The test reproduces Ray's failure and is marked as expected to fail. Not
strictly: whether Ray 2.60 fails depends on when Tune last saved its experiment state before the
kill, and on a loaded 2-core machine it once saved after the trials ended and the restore passed
(2026-12-07), so a pass is reported (XPASS) without failing the run. The journal stays until a
Ray release passes it every time. Ray 2.60 is pinned in pyproject.toml for this and for the Ray
internals the search relies on (Trial.error_file, TUNE_* variables).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

DRIVER = textwrap.dedent('''
    import os, sys, tempfile, time
    import optuna, ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    storage, markers, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    path = os.path.join(storage, "restore")

    def trainable(config):
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                start = int(open(os.path.join(folder, "epoch")).read())
        for epoch in range(start + 1, 5):
            with tempfile.TemporaryDirectory() as folder:
                open(os.path.join(folder, "epoch"), "w").write(str(epoch))
                checkpoint = tune.Checkpoint.from_directory(folder)
                tune.report({"epoch": epoch, "score": config["x"] * epoch}, checkpoint=checkpoint)
            if epoch == 2:  # the first two trials run through; the others wait here until released
                n = 0
                while True:
                    try:
                        os.close(os.open(os.path.join(markers, f"arrived-{n}"), os.O_CREAT | os.O_EXCL))
                        break
                    except FileExistsError:
                        n += 1
                while n >= 2 and not os.path.exists(os.path.join(markers, "release")):
                    time.sleep(0.05)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    db = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(storage, 'optuna.db')}")
    if mode == "start":
        searcher = OptunaSearch({"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="score", mode="max",
                                study_name="restore", storage=db)
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=6),
                           run_config=tune.RunConfig(name="restore", storage_path=storage, verbose=0))
    else:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    grid = tuner.fit()
    print("RESULTS", len(grid), sum(r.error is None for r in grid),
          sum(r.metrics.get("epoch") == 4 for r in grid if r.metrics), flush=True)
''')


def run_driver(tmp_path: Path, ray_tmp: str, mode: str) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TUNE_DISABLE_SIGINT_HANDLER": "1"}
    log = open(tmp_path / f"{mode}.log", "w")
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "storage"), str(tmp_path / "markers"), mode],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.xfail(strict=False, reason="Ray 2.60: the restored run reports a trial the SQLite study already has as "
                                        "finished again, and stops on optuna's UpdateFinishedTrialError (a TuneError), "
                                        "unless Tune's own periodic save happened to land after the trials ended")
def test_ray_tuner_restore_after_sigkill_finishes_every_trial_once(tmp_path):
    (tmp_path / "markers").mkdir()
    (tmp_path / "storage").mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="hpt-rr-")  # short: Ray's socket paths must stay under 108 bytes
    try:
        check_restore(tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def check_restore(tmp_path: Path, ray_tmp: str) -> None:
    first = run_driver(tmp_path, ray_tmp, "start")
    try:
        deadline = time.time() + 600
        # two trials ran through epoch 2; a third is waiting there with its checkpoint saved
        while len(list((tmp_path / "markers").glob("arrived-*"))) < 3:
            assert first.poll() is None, (tmp_path / "start.log").read_text()[-3000:]
            assert time.time() < deadline, "the first run did not get far enough"
            time.sleep(0.1)
        time.sleep(1.0)  # let Tune write its experiment state once more, as a long search would have
    finally:
        stop(first)  # SIGKILL to the driver and its Ray, as a lost machine would
    (tmp_path / "markers" / "release").touch()
    second = run_driver(tmp_path, ray_tmp, "resume")
    try:
        second.wait(timeout=600)
    finally:
        stop(second)
    log = (tmp_path / "resume.log").read_text()
    line = next((x for x in log.splitlines() if x.startswith("RESULTS")), None)
    assert second.returncode == 0 and line is not None, log[-3000:]
    _, trials, ok, complete = line.split()
    assert (int(trials), int(ok), int(complete)) == (6, 6, 6), line
    study = optuna.load_study(study_name="restore", storage=f"sqlite:///{tmp_path / 'storage' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and all(s == optuna.trial.TrialState.COMPLETE for s in states), states
