"""State shared between runs: the run-dir lock, caches built once under a lock and published by a
rename, and cache keys that cover everything that shapes what is cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.files import DirectoryLock, build_once
from test_bad_inputs import REPO, cli_env


def test_concurrent_builders_of_one_key_build_once(tmp_path):
    """The second builder waits for the first and reuses its result; nobody sees a partial entry."""
    builds, seen = [], []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        (tmp / "part").write_text("half")
        time.sleep(0.3)  # a slow build: the other thread arrives meanwhile
        (tmp / "done").write_text("whole")

    def use():
        final = build_once(tmp_path / "entry", build, "done")
        seen.append(sorted(p.name for p in final.iterdir()))

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and seen == [["done", "part"]] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temp dir, no lock file left


def test_a_failed_build_publishes_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "entry", broken, "done")
    assert not (tmp_path / "entry").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".entry.lock"]  # kept: removing it could let two builds race
    assert build_once(tmp_path / "entry", lambda tmp: (tmp / "done").write_text("ok"), "done").is_dir()


def test_run_dir_lock_is_exclusive_and_released(tmp_path, monkeypatch):
    from lightning_modules.run import run_dir as run_dirs
    from lightning_modules.config.loading import load_config

    monkeypatch.delenv(run_dirs.RUN_DIR_ENV, raising=False)
    cfg = load_config(REPO / "configs/demo.yaml", [f"run_dir={tmp_path / 'run'}"])
    run_dir = run_dirs.prepare_run_dir(cfg)
    os.environ.pop(run_dirs.RUN_DIR_ENV)  # as a second process would see it (not monkeypatch: it would restore it)
    with pytest.raises(UserError, match=f"run_dir '{run_dir}' is in use by another run"):
        run_dirs.prepare_run_dir(cfg)
    run_dirs.release_run_dir(run_dir)
    assert run_dirs.prepare_run_dir(cfg) == run_dir
    run_dirs.release_run_dir(run_dir)


@pytest.mark.slow
def test_run_dir_lock_of_a_killed_run_is_not_stale(tmp_path):
    """The OS drops the lock with its holder: a SIGKILLed run leaves nothing to clean up."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom core.files import DirectoryLock\n"
        f"assert DirectoryLock({str(tmp_path)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)")],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    lock = DirectoryLock(tmp_path)
    assert not lock.acquire() and lock.holder() == str(holder.pid)
    holder.kill()
    holder.wait(timeout=30)
    assert lock.acquire()
    lock.release()


@pytest.mark.slow
def test_two_processes_building_one_world(tmp_path):
    """Both get the whole world (before, one could delete the other's published world)."""
    script = ("import sys\nfrom datamodules.mirage_world import WorldConfig, build_world\n"
              "from pathlib import Path\n"
              "w = build_world(WorldConfig(n_base=160, n_safety=200, n_val=30, n_test=30), sys.argv[1])\n"
              "import json\nrecords = json.loads((w / 'test.json').read_text())\n"
              "missing = [r['image'] for r in records if not (w / r['image']).is_file()]\n"
              "print(len(records), len(missing))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        n, missing = map(int, out.split())
        assert n > 0 and missing == 0
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_base_cache_key_covers_what_shapes_the_base(tmp_path):
    """Settings the base's training reads give distinct cache entries (before, weight decay,
    warmup, betas and the image mode of whichever run came first decided it for all)."""
    from datamodules.safety import DataFiles
    from lightning_modules.config.loading import load_config
    from lightning_modules.run.pretrain import base_cache_dir

    (tmp_path / "base.json").write_text("[]")
    files = DataFiles(train=None, val=None, test=None, image_dir=None, compliance_cue="what", refusal_cue="share",
                      general=tmp_path / "base.json")
    key = lambda *o: base_cache_dir(load_config(REPO / "configs/demo.yaml", list(o)), files)  # noqa: E731
    keys = [key(), key("optim.weight_decay=0.1"), key("optim.warmup_ratio=0.5"), key("optim.betas=[0.8,0.99]"),
            key("data.image_mode=blank")]
    assert len(set(keys)) == len(keys)
    assert key("optim.lr=0.5") == keys[0]  # the base has its own lr (base.lr)


def test_appends_are_line_atomic_and_a_half_line_is_dropped_with_a_warning(tmp_path):
    """A crash mid-append leaves a half line: the next read drops it with a warning (and, for
    samples.jsonl, cuts it from the file); the next append starts on a line of its own."""
    from core.files import append_lines, read_lines
    from metrics.samples import read_samples

    path = tmp_path / "samples.jsonl"
    row = {"set": "s", "id": "1", "subset": "unsafes", "shot": 0, "prompt": "q", "response": "a"}
    append_lines(path, [json.dumps(row)])
    with open(path, "ab") as fh:  # what a process killed inside write() leaves
        fh.write(b'{"set": "s", "id": "2", "sub')
    with pytest.warns(UserWarning, match=r"samples.jsonl: dropped a half-written last line \(line 2"):
        assert [r["id"] for r in read_samples(path)] == ["1"]
    assert path.read_text() == json.dumps(row) + "\n"  # repaired: the resumed run regenerates id 2
    with open(path, "ab") as fh:
        fh.write(b'{"set": "s", "id": "3", "sub')
    append_lines(path, [json.dumps(row | {"id": "4"})])  # closes the half line before its own
    with pytest.warns(UserWarning, match="line 2 is cut short"):
        assert [r["id"] for r in read_samples(path)] == ["1", "4"]
    assert [n for n, _ in read_lines(path)] == [1, 2, 3]


def test_a_write_under_a_file_is_one_line(tmp_path):
    """atomic_write into a 'folder' that is a file: the one-line error, not the clean-up's traceback."""
    from core.errors import UserError
    from core.files import atomic_write

    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write results .*results/out\.json"):
        atomic_write(tmp_path / "results" / "out.json", "{}", what="results")
    assert (tmp_path / "results").read_text() == "not a folder"
