"""Bad inputs through the real CLI: exit status 2, one line naming the file / record / key / value
at fault, no traceback (unless --debug), and nothing already in the run directory lost.

Each case runs the fit CLI's `main` in a process of its own, on a hand-made VLGuard-format fixture
with a random tiny model. Importing torch + Lightning costs seconds of CPU per process, so the
cases are forked one by one from a "zygote" process that imported the CLI once (the same code,
a real exit status and real stderr); `test_real_entry_point` runs `python -m lightning_modules.fit`
itself to show that the zygote behaves like it.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlguard_fixture import vlguard_overrides, write_vlguard

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240

ZYGOTE = r"""
import json, os, sys, traceback
from lightning_modules.fit import main  # the heavy imports, once; no torch op runs before a fork
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["lightning_modules.fit", *job["argv"]]
        code = 1
        try:
            main(job["argv"])
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    env.pop("SAFETY_MIRAGE_RUN_DIR", None)  # never inherit a run dir from an outer DDP run
    return env


def run_fit(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_modules.fit", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


class Zygote:
    """Forks one CLI process per `run(args)`; returns (exit status, stderr)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=cli_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.n = 0

    def run(self, args: list[str]) -> tuple[int, str]:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        self.proc.stdin.write(json.dumps({"argv": args, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        status = self.proc.stdout.readline()
        assert status, "the zygote process died"
        return int(status), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- the table: (case id, how to break the fixture, extra overrides, text the error line must name) --------
def _write(rel: str, text: str):
    return lambda d: (d / rel).write_text(text)


def _drop_key(rel: str, key: str):
    def apply(d: Path):
        records = json.loads((d / rel).read_text())
        del records[3][key]
        (d / rel).write_text(json.dumps(records))
    return apply


def _drop_response(rel: str):
    def apply(d: Path):
        records = json.loads((d / rel).read_text())
        del records[1]["instr-resp"][0]["response"]
        (d / rel).write_text(json.dumps(records))
    return apply


def _unlink(rel: str):
    return lambda d: (d / rel).unlink()


def _truncate_image(rel: str):
    """A PNG whose header is fine (the up-front check passes) and whose pixel data is cut short:
    it fails only when a DataLoader worker decodes it."""
    def apply(d: Path):
        noise = Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3))
        buffer = io.BytesIO()
        noise.save(buffer, "PNG")
        (d / rel).write_bytes(buffer.getvalue()[:200])
    return apply


def _bad_yaml(d: Path):
    (d / "bad.yaml").write_text("defaults: [model/tiny\nname: x\n")


def _nothing(d: Path):
    pass


def _other_model_checkpoint(d: Path):
    """A loadable Lightning checkpoint whose weights belong to another model."""
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"model.x": torch.zeros(1)}, "global_step": 3,
                "epoch": 0}, d / "other.ckpt")


CASES = [
    ("malformed_json", _write("train.json", '[{"id": "r0", "safe": true,'), [], "train.json: malformed JSON at line 1"),
    ("record_missing_field", _drop_key("train.json", "safe"), [], "train.json: record 3 is missing 'id' or 'safe'"),
    ("item_missing_response", _drop_response("val.json"), [], "val.json: record 1 (id='r25') is missing 'response'"),
    ("missing_image", _unlink("images/0.png"), [], "missing image {data}/images/0.png (record id=r0)"),
    ("corrupt_image", _write("images/1.png", "not a png"), [], "corrupt image {data}/images/1.png (record id=r1)"),
    ("truncated_image_in_worker", _truncate_image("images/38.png"), ["data.num_workers=1"],  # the first test record
     "corrupt image {data}/images/38.png (record id=r38): image file is truncated"),
    ("empty_split", _write("val.json", "[]"), [], "val.json: empty split"),
    ("data_file_not_found", _nothing, ["data.test_file={data}/nope.json"], "data file not found: {data}/nope.json"),
    ("unknown_config_key", _nothing, ["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    ("unknown_trainer_key", _nothing, ["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
    ("wrong_type", _nothing, ["data.batch_size=many"], "'data.batch_size'"),
    ("bad_override", _nothing, ["optim.lr"], "override 'optim.lr' is not of the form key=value"),
    ("unknown_method", _nothing, ["method.name=dpo"], "unknown method 'dpo'"),
    ("unknown_method_group", _nothing, ["method=dpo"], "unknown method config 'dpo'"),
    ("unknown_refusal_preset", _nothing, ["eval.refusal_preset=strictest"], "unknown eval.refusal_preset 'strictest'"),
    ("unknown_data_kind", _nothing, ["data.kind=parquet"], "unknown data.kind 'parquet'"),
    ("model_not_loadable_offline", _nothing, ["model.name_or_path=nobody/no-such-vlm"],
     "cannot load model.name_or_path='nobody/no-such-vlm'"),
    ("sequence_too_long", _nothing, ["data.max_length=12"], "more than data.max_length=12"),
    ("run_dir_not_writable", _nothing, ["run_dir={data}/train.json/run"],
     "run_dir '{data}/train.json/run' is not writable"),
    ("resume_checkpoint_missing", _nothing, ["resume={data}/nope.ckpt"],
     "resume checkpoint not found: {data}/nope.ckpt"),
    ("resume_checkpoint_corrupt", _nothing, ["resume=last"],  # the run dir's last.ckpt holds garbage
     "resume checkpoint {run}/checkpoints/last.ckpt is not a PyTorch checkpoint"),
    ("resume_checkpoint_of_another_model", _other_model_checkpoint, ["resume={data}/other.ckpt"],
     "resume checkpoint {data}/other.ckpt does not fit this model (changed config?): Missing key(s)"),
    ("deepspeed_not_installed", _nothing, ["trainer.strategy=deepspeed_stage_2"],
     "trainer.strategy 'deepspeed_stage_2' needs DeepSpeed, which is not installed"),
    ("invalid_yaml_config", _bad_yaml, ["--config={data}/bad.yaml"], "bad.yaml: invalid YAML"),
]


def _prepare_case(case, root: Path):
    name, corrupt, extra, _ = case
    data, run_dir = root / name / "data", root / name / "run"
    files = write_vlguard(data)
    corrupt(data)
    # A finished run already lives in the run dir: a failed run must leave it as it was.
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "results.csv").write_text("eval_set,asr\nunsafe_clean,0.5\n")
    (run_dir / "config.yaml").write_text("name: earlier\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier checkpoint")
    extra = [e.replace("{data}", str(data)) for e in extra]
    options = [e for e in extra if e.startswith("--")]  # a later --config wins over the first
    overrides = [e for e in extra if not e.startswith("--")]
    args = ["--config", "configs/demo.yaml", *options, *vlguard_overrides(files, run_dir), "trainer.max_steps=2",
            *overrides]
    return data, run_dir, args


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(case, zygote, tmp_path):
    name, _, _, expected = case
    data, run_dir, args = _prepare_case(case, tmp_path)
    status, stderr = zygote.run(args)
    assert status == 2, f"exit {status}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert expected.replace("{data}", str(data)).replace("{run}", str(run_dir)) in errors[0]
    # Nothing already written is lost.
    assert (run_dir / "results.csv").read_text() == "eval_set,asr\nunsafe_clean,0.5\n"
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier checkpoint"
    assert (run_dir / "config.yaml").read_text() == "name: earlier\n"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not (run_dir / "model").exists()


def test_real_entry_point(tmp_path):
    """`python -m lightning_modules.fit` itself: one line without --debug, a traceback with it."""
    files = write_vlguard(tmp_path / "data")
    args = ["--config", "configs/demo.yaml", *vlguard_overrides(files, tmp_path / "run"), "data.max_length=12"]
    proc = run_fit(args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: record id=")
    proc = run_fit(["--debug", *args])
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "UserError: record id=" in proc.stderr
