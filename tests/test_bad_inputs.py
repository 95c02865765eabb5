"""Bad inputs through the real CLIs: exit status 2, one line on stderr naming the file / record /
key / value at fault, no traceback, and nothing in an existing run directory changed.

The table runs each command's `main(argv)` in this process (a `cli_main` raises SystemExit(2) with
the line on stderr); nearly every case fails while the config or the data is read, before a model
is built. `test_real_entry_point` runs `python -m lightning_modules.fit` itself, once, to show the
same line comes out of a real process (and a traceback with --debug).
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from core.files import DirectoryLock
from faults import full_disk
from vlguard_fixture import vlguard_overrides, write_vlguard

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
EARLIER = {"results.csv": b"eval_set,asr\nunsafe_clean,0.5\n", "config.yaml": b"name: earlier\n",
           "checkpoints/last.ckpt": b"an earlier checkpoint"}


def cli_env() -> dict:
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("SAFETY_MIRAGE_RUN_DIR", None)  # never inherit a run dir from an outer DDP run
    return env


def run_fit(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_modules.fit", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# -- ways to break the fixture ----------------------------------------------------------------------
def _write(rel: str, text: str | bytes):
    return lambda d: (d / rel).write_bytes(text.encode() if isinstance(text, str) else text)


def _edit_record(rel: str, edit):
    def apply(d: Path):
        records = json.loads((d / rel).read_text())
        edit(records)
        (d / rel).write_text(json.dumps(records))
    return apply


def _set_field(rel: str, index: int, key: str, value):
    return _edit_record(rel, lambda records: records[index].__setitem__(key, value))


def _encode(rel: str, codec: str, accent: bool = True):
    """The file re-encoded (with one non-ASCII character, so Latin-1 differs from UTF-8)."""
    def apply(d: Path):
        records = json.loads((d / rel).read_text())
        if accent:
            records[0]["instr-resp"][0]["response"] = "café"
        (d / rel).write_bytes(json.dumps(records, ensure_ascii=False).encode(codec))
    return apply


def _unlink(rel: str):
    return lambda d: (d / rel).unlink()


def _image_to_dir(rel: str):
    def apply(d: Path):
        (d / rel).unlink()
        (d / rel).mkdir()
    return apply


def _truncate_image(rel: str):
    """A PNG whose header is fine (the up-front check passes) and whose pixel data is cut short:
    it fails only when a DataLoader worker decodes it."""
    def apply(d: Path):
        noise = Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3))
        buffer = io.BytesIO()
        noise.save(buffer, "PNG")
        (d / rel).write_bytes(buffer.getvalue()[:200])
    return apply


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(rel: str):
    """A 100-byte PNG that claims 100000 x 100000 pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + \
        _png_chunk(b"IEND", b"")
    return _write(rel, png)


def _bad_yaml(d: Path):
    (d / "bad.yaml").write_text("defaults: [model/tiny\nname: x\n")


def _nothing(d: Path):
    pass


def _checkpoint(name: str, **extra):
    """A loadable Lightning checkpoint (weights of another model)."""
    def apply(d: Path):
        torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"model.x": torch.zeros(1)},
                    "global_step": 3, "epoch": 0, **extra}, d / name)
    return apply


def _corrupt_member(d: Path):
    """A real checkpoint with bytes flipped inside one member's data (its CRC no longer matches)."""
    path = d / "corrupt.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "global_step": 3}, path)
    data = bytearray(path.read_bytes())
    start = data.index(struct.pack("<f", 1000.0))  # inside the tensor's data member
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _sharded_lookalike(d: Path):
    (d / "ckptdir").mkdir()
    (d / "ckptdir" / "notes.txt").write_text("not a checkpoint")


def _trained_with_other_settings(d: Path):
    from lightning_modules.config.loading import load_config

    files = {f"data.{s}_file": str(d / f"{s}.json") for s in ("train", "val", "test")}
    cfg = load_config(REPO / "configs/demo.yaml", vlguard_overrides(files, d / "x") + ["data.max_length=32",
                                                                                       "method=npo"])
    _checkpoint("other_settings.ckpt", hyper_parameters=OmegaConf.to_container(cfg, resolve=True))(d)


def _finished_run(d: Path):
    """The run dir's last.ckpt is a real checkpoint at step 2 (its results.csv says it finished)."""
    run = d.parent / "run"
    torch.save({"state_dict": {}, "global_step": 2, "epoch": 0}, run / "checkpoints" / "last.ckpt")


def _lock_run_dir(d: Path):
    lock = DirectoryLock(d.parent / "run")
    assert lock.acquire()
    _HELD.append(lock)


_HELD: list[DirectoryLock] = []
_PATCH: list = []  # the running case's monkeypatch, for breakers that change the machine, not the files


def _without_package(name: str) -> None:
    """The machine without an optional extra (the test extra installs them all): its spec is not found."""
    import importlib.util

    find_spec = importlib.util.find_spec
    _PATCH[0].setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))


def _no_gpu(d: Path):
    _PATCH[0].setattr(torch.cuda, "is_available", lambda: False)


def _samples_in_run(text: str | bytes):
    """The run directory's samples.jsonl holds `text` (another tool's lines, a foreign file)."""
    return lambda d: (d.parent / "run" / "samples.jsonl").write_bytes(text.encode() if isinstance(text, str) else text)


SAMPLE = json.dumps({"set": "unsafe_clean", "id": "r38", "subset": "unsafes", "shot": 0, "prompt": "q", "response": "a"})


def _truncated_checkpoint(d: Path):
    """A real checkpoint cut in half (a copy interrupted mid-way)."""
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "global_step": 3}, d / "cut.ckpt")
    data = (d / "cut.ckpt").read_bytes()
    (d / "cut.ckpt").write_bytes(data[:len(data) // 2])


def _tensorboard_disk_full(d: Path):
    """The disk fills while TensorBoard writes its event file (a writer we do not own)."""
    import errno

    from lightning.pytorch.loggers import TensorBoardLogger

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.log_dir) / "events.out.tfevents"))

    _PATCH[0].setattr(TensorBoardLogger, "log_metrics", full)

# (case id, how to break the fixture, extra arguments, text the error line must name)
FIT_CONFIG = [
    ("lr_negative", _nothing, ["optim.lr=-1"], "'optim.lr': -1.0 (allowed: a number >= 0)"),
    ("betas_out_of_range", _nothing, ["optim.betas=[1.5,0.9]"], "'optim.betas': [1.5, 0.9]"),
    ("betas_wrong_length", _nothing, ["optim.betas=[0.9]"], "'optim.betas'"),
    ("batch_size_zero", _nothing, ["data.batch_size=0"], "'data.batch_size': 0 (allowed: an integer >= 1)"),
    ("num_workers_negative", _nothing, ["data.num_workers=-1"], "'data.num_workers': -1"),
    ("threads_negative", _nothing, ["threads=-1"], "'threads': -1"),
    ("beta_not_a_number", _nothing, ["method=npo", "method.beta=abc"], "'method.beta': 'abc' (allowed: a number)"),
    ("rmu_layer_fractional", _nothing, ["method=rmu", "method.layer=1.5"], "'method.layer': 1.5 (allowed: an integer or one of auto)"),
    ("param_pattern_bad_regex", _nothing, ["method=rmu", "method.param_pattern=(mlp"],
     "'method.param_pattern': '(mlp' (not a regular expression"),
    ("lora_rank_zero", _nothing, ["model.lora.r=0"], "'model.lora.r': 0"),
    ("lora_target_bad_regex", _nothing, ["model.lora.target_modules=(q_proj|v_proj"], "'model.lora.target_modules'"),
    ("max_new_tokens_zero", _nothing, ["eval.max_new_tokens=0"], "'eval.max_new_tokens': 0"),
    ("checkpoint_interval_negative", _nothing, ["checkpoint.every_n_train_steps=-5"],
     "'checkpoint.every_n_train_steps': -5"),
    ("max_steps_not_a_number", _nothing, ["trainer.max_steps=abc"], "'trainer.max_steps': 'abc' (allowed: an integer)"),
    ("max_steps_below_minus_one", _nothing, ["trainer.max_steps=-7"], "'trainer.max_steps': -7"),
    ("precision_unknown", _nothing, ["trainer.precision=17"], "'trainer.precision': 17"),
    ("warmup_ratio_above_one", _nothing, ["optim.warmup_ratio=1.5"], "'optim.warmup_ratio': 1.5"),
    ("max_eval_samples_negative", _nothing, ["data.max_eval_samples=-3"], "'data.max_eval_samples': -3"),
    ("image_mode_unknown", _nothing, ["data.image_mode=sepia"], "unknown data.image_mode 'sepia'"),
    ("scheduler_unknown", _nothing, ["optim.scheduler=linear"], "unknown optim.scheduler 'linear'"),
    ("npo_reference_unknown", _nothing, ["method=npo", "method.reference=twin"], "unknown method.reference 'twin'"),
    ("world_rho_out_of_range", _nothing, ["data=mirage_world", "data.world.rho=1.5"], "data.world.rho=1.5"),
    ("unknown_config_key", _nothing, ["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    ("unknown_trainer_key", _nothing, ["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
    ("unknown_method_key", _nothing, ["method=npo", "method.gamma=1"], "unknown config key 'method.gamma'"),
    ("wrong_type", _nothing, ["data.batch_size=many"], "'data.batch_size': 'many'"),
    ("bad_override", _nothing, ["optim.lr"], "override 'optim.lr' is not of the form key=value"),
    ("unparsable_override", _nothing, ["optim.betas=[0.9"], "invalid override 'optim.betas=[0.9'"),
    ("unknown_method", _nothing, ["method.name=dpo"], "unknown method 'dpo'"),
    ("unknown_method_group", _nothing, ["method=dpo"], "unknown method config 'dpo'"),
    ("unknown_refusal_preset", _nothing, ["eval.refusal_preset=strictest"], "unknown eval.refusal_preset 'strictest'"),
    ("unknown_data_kind", _nothing, ["data.kind=parquet"], "unknown data.kind 'parquet'"),
    ("invalid_yaml_config", _bad_yaml, ["--config={data}/bad.yaml"], "bad.yaml: invalid YAML"),
    ("deepspeed_not_installed", lambda d: _without_package("deepspeed"), ["trainer.strategy=deepspeed_stage_2"],
     "trainer.strategy 'deepspeed_stage_2' needs DeepSpeed, which is not installed"),
    ("interpolation_cycle", _nothing, ["name=${run_dir}", "run_dir={run}/${name}"],
     "cannot resolve config: the interpolations name -> run_dir -> name form a cycle (name='${run_dir}', "
     "run_dir='{run}/${name}'); set one of these keys to a plain value"),
    ("interpolation_cycle_in_a_section", _nothing, ["optim.lr=${optim.weight_decay}", "optim.weight_decay=${optim.lr}"],
     "the interpolations optim.lr -> optim.weight_decay -> optim.lr form a cycle"),
    ("interpolation_of_a_missing_key", _nothing, ["name=${nope}"], "cannot resolve config: Interpolation key 'nope' not found"),
    ("seed_not_a_number", _nothing, ["seed=abc"], "'seed': 'abc' (allowed: an integer)"),
    ("config_file_missing", _nothing, ["--config={data}/nope.yaml"], "config file not found: {data}/nope.yaml"),
    ("gpu_trainer_without_a_gpu", _no_gpu, ["trainer=gpu"],
     "trainer.accelerator=gpu but torch finds no CUDA GPU on this machine; add trainer=cpu to the command line"),
    ("cuda_accelerator_without_a_gpu", _no_gpu, ["trainer.accelerator=cuda"],
     "trainer.accelerator=cuda but torch finds no CUDA GPU"),
]
FIT_DATA = [
    ("malformed_json", _write("train.json", '[{"id": "r0", "safe": true,'), [], "train.json: malformed JSON at line 1"),
    ("latin1_file", _encode("train.json", "latin-1"), [], "train.json: not UTF-8 text"),
    ("utf16_file", _encode("val.json", "utf-16"), [], "val.json: the file is UTF-16"),
    ("shot_not_an_integer", _set_field("test.json", 2, "shot", "two"), [],
     "test.json: record 2 (id='r40'): field 'shot' is 'two', not an integer"),
    ("image_not_a_string", _set_field("train.json", 1, "image", 7), [],
     "train.json: record 1 (id='r1'): field 'image' is 7, not a string"),
    ("safe_not_a_bool", _set_field("train.json", 2, "safe", "yes"), [], "field 'safe' is 'yes'"),
    ("record_missing_field", _edit_record("train.json", lambda r: r[3].pop("safe")), [],
     "train.json: record 3 is missing 'id' or 'safe'"),
    ("item_missing_response", _edit_record("val.json", lambda r: r[1]["instr-resp"][0].pop("response")), [],
     "val.json: record 1 (id='r25') is missing 'response'"),
    ("empty_split", _write("val.json", "[]"), [], "val.json: empty split"),
    ("empty_file", _write("val.json", ""), [], "val.json: empty file"),
    ("not_a_list", _write("val.json", '{"id": 1}'), [], "val.json: expected a JSON list of records"),
    ("data_file_not_found", _nothing, ["data.test_file={data}/nope.json"], "data file not found: {data}/nope.json"),
    ("data_file_is_a_directory", _nothing, ["data.test_file={data}/images"], "data file {data}/images is not a file"),
    ("missing_image", _unlink("images/0.png"), [], "missing image {data}/images/0.png (record id=r0)"),
    ("corrupt_image", _write("images/1.png", "not a png"), [], "corrupt image {data}/images/1.png (record id=r1)"),
    ("image_is_a_directory", _image_to_dir("images/2.png"), [], "image {data}/images/2.png (record id=r2) is a directory"),
    ("decompression_bomb", _bomb("images/3.png"), [], "image {data}/images/3.png (record id=r3) is too large"),
    ("truncated_image_in_worker", _truncate_image("images/38.png"), ["data.num_workers=1"],  # the first test record
     "corrupt image {data}/images/38.png (record id=r38): image file is truncated"),
    ("model_not_loadable_offline", _nothing, ["model.name_or_path=nobody/no-such-vlm"],
     "cannot load model.name_or_path='nobody/no-such-vlm'"),
    ("sequence_too_long", _nothing, ["data.max_length=12"], "more than data.max_length=12"),
]
FIT_RUN = [
    ("run_dir_not_writable", _nothing, ["run_dir={data}/train.json/run"], "run_dir '{data}/train.json/run' is not writable"),
    ("run_dir_locked", _lock_run_dir, ["resume=last"], "run_dir '{run}' is in use by another run"),
    ("resume_checkpoint_missing", _nothing, ["resume={data}/nope.ckpt"], "resume checkpoint not found: {data}/nope.ckpt"),
    ("resume_checkpoint_not_a_zip", _nothing, ["resume=last"],  # the run dir's last.ckpt holds garbage
     "resume checkpoint {run}/checkpoints/last.ckpt is not a PyTorch checkpoint"),
    ("resume_checkpoint_corrupt_member", _corrupt_member, ["resume={data}/corrupt.ckpt"],
     "resume checkpoint {data}/corrupt.ckpt is corrupt: member"),
    ("resume_checkpoint_is_a_directory", _sharded_lookalike, ["resume={data}/ckptdir"],
     "resume checkpoint {data}/ckptdir is a directory but not a sharded"),
    ("resume_checkpoint_not_lightning", lambda d: torch.save([1, 2], d / "list.ckpt"), ["resume={data}/list.ckpt"],
     "resume checkpoint {data}/list.ckpt is not a Lightning checkpoint"),
    ("resume_checkpoint_of_another_model", _checkpoint("other.ckpt"), ["resume={data}/other.ckpt", "trainer.max_steps=9"],
     "resume checkpoint {data}/other.ckpt does not fit this model (changed config?): Missing key(s)"),
    ("resume_with_changed_settings", _trained_with_other_settings, ["resume={data}/other_settings.ckpt"],
     "was trained with other settings: data.max_length, method.beta"),
    ("resume_finished_run", _finished_run, ["resume=last"], "run {run} is finished (checkpoint at step 2"),
    ("resume_checkpoint_truncated", _truncated_checkpoint, ["resume={data}/cut.ckpt"],
     "resume checkpoint {data}/cut.ckpt is not a PyTorch checkpoint"),
    ("resume_checkpoint_empty", _write("empty.ckpt", b""), ["resume={data}/empty.ckpt"],
     "resume checkpoint {data}/empty.ckpt is"),
    ("run_dir_is_a_file", _nothing, ["run_dir={data}/train.json"], "run_dir '{data}/train.json' is not writable"),
    ("tensorboard_disk_full", _tensorboard_disk_full, ["trainer.max_steps=1", "eval.val_at_start=false"],
     "No space left on device (disk full)"),
]
EVALUATE = [
    ("evaluate_bootstrap_negative", _nothing, ["evaluate.bootstrap=-1"], "'evaluate.bootstrap': -1"),
    ("evaluate_confidence_above_one", _nothing, ["evaluate.confidence=1.5"], "'evaluate.confidence': 1.5"),
    ("evaluate_unknown_judge", _nothing, ["evaluate.judge.name=gpt"], "unknown evaluate.judge.name 'gpt'"),
    ("evaluate_max_samples_zero", _nothing, ["evaluate.max_samples=0"], "'evaluate.max_samples': 0"),
    ("evaluate_unknown_key", _nothing, ["evaluate.bootstrapp=3"], "unknown config key 'evaluate.bootstrapp'"),
    ("evaluate_latin1_file", _encode("test.json", "latin-1"), [], "test.json: not UTF-8 text"),
    ("evaluate_utf16_file", _encode("attacks/test_what_3shot.json", "utf-16"), [],
     "test_what_3shot.json: the file is UTF-16"),
    ("evaluate_shot_not_an_integer", _set_field("attacks/test_what_3shot.json", 0, "shot", 1.5), [],
     "field 'shot' is 1.5, not an integer"),
    ("evaluate_file_missing", _unlink("attacks/test_share_1shot.json"), [], "test_share_1shot.json"),
    ("evaluate_run_dir_locked", _lock_run_dir, [], "run_dir '{run}' is in use by another run"),
    ("evaluate_samples_stray_line", _samples_in_run('{"note": "checked by hand"}\n'), [],
     "{run}/samples.jsonl: line 1 is not a sample of fit or evaluate (it has no 'set', 'id', 'subset', 'shot', "
     "'prompt'); remove the line or the file"),
    ("evaluate_samples_stray_line_after_samples", _samples_in_run(SAMPLE + "\n" + '{"note": 1}\n'), [],
     "{run}/samples.jsonl: line 2 is not a sample"),
    ("evaluate_samples_line_not_an_object", _samples_in_run("[1, 2]\n"), [],
     "{run}/samples.jsonl: line 1 is a list, not a JSON object"),
    ("evaluate_samples_not_utf8", _samples_in_run(b'{"note": "caf\xe9"}\n'), [], "{run}/samples.jsonl: not UTF-8 text"),
    ("evaluate_gpu_without_a_gpu", _no_gpu, ["trainer.accelerator=gpu"],
     "trainer.accelerator=gpu but torch finds no CUDA GPU on this machine"),
    ("evaluate_interpolation_cycle", _nothing, ["name=${run_dir}", "run_dir={run}/${name}"],
     "the interpolations name -> run_dir -> name form a cycle"),
]
AUDIT = [
    ("audit_latin1_file", _encode("test.json", "latin-1"), ["{data}/test.json"], "test.json: not UTF-8 text"),
    ("audit_utf16_file", _encode("test.json", "utf-16"), ["{data}/test.json"], "test.json: the file is UTF-16"),
    ("audit_malformed_json", _write("test.json", "[{"), ["{data}/test.json"], "test.json: malformed JSON"),
    ("audit_directory", _nothing, ["{data}/images"], "{data}/images is not a file"),
    ("audit_empty_split", _write("test.json", "[]"), ["{data}/test.json"], "test.json: empty split"),
    ("audit_alpha_zero", _nothing, ["{data}/test.json", "--alpha", "0"], "--alpha must be > 0"),
    ("audit_top_zero", _nothing, ["{data}/test.json", "--top", "0"], "--top and --min-count must be >= 1"),
    ("audit_file_missing", _nothing, ["{data}/nope.json"], "{data}/nope.json"),
]
REWRITE = [
    ("rewrite_output_is_a_directory", _nothing, ["{data}/test.json", "{data}/images", "--attack", "one_word"],
     "cannot write rewritten file {data}/images"),
    ("rewrite_disk_full", lambda d: full_disk(_PATCH[0], match="out.json"),
     ["{data}/test.json", "{data}/out.json", "--attack", "one_word"],
     "cannot write rewritten file {data}/out.json: No space left on device (disk full)"),
    ("rewrite_input_latin1", _encode("test.json", "latin-1"), ["{data}/test.json", "{data}/out.json", "--attack", "kshot"],
     "test.json: not UTF-8 text"),
]


def _mm_safetybench(d: Path):
    from benchmark_fixtures import save_image, write_json
    from benchmark_fixtures import MMSB_QUESTION

    write_json(d / "MMSB" / "data" / "processed_questions" / "01-Illegal_Activitiy.json", {"0": MMSB_QUESTION})
    save_image(d / "MMSB" / "data" / "imgs" / "01-Illegal_Activitiy" / "SD" / "0.jpg")


CONVERT = ["convert", "--kind", "mm_safetybench", "--path", "{data}/MMSB", "--variant", "SD"]
BENCHMARKS = [
    ("benchmarks_convert_path_missing", _nothing,
     ["convert", "--kind", "mm_safetybench", "--path", "{data}/nope", "--out", "{data}/o.json"], "benchmark data not found"),
    ("benchmarks_convert_unknown_variant", _mm_safetybench, [*CONVERT[:-1], "SDX", "--out", "{data}/o.json"],
     "variant 'SDX'"),
    ("benchmarks_convert_output_is_a_directory", _mm_safetybench, [*CONVERT, "--out", "{data}/images"],
     "cannot write converted benchmark file {data}/images"),
    ("benchmarks_convert_disk_full", lambda d: (_mm_safetybench(d), full_disk(_PATCH[0], match="o.json")),
     [*CONVERT, "--out", "{data}/o.json"], "cannot write converted benchmark file {data}/o.json: No space left"),
]
# The exact first try of a laptop user: a GPU experiment config, no GPU (the whole argv).
GPU_ON_A_LAPTOP = ["--config", "configs/experiment/vlguard_npo.yaml", "model=tiny-llava", "data.root={data}",
                   "run_dir={run}"]


def _fit_args(data: Path, run_dir: Path, files: dict, extra: list[str]) -> list[str]:
    options = [e for e in extra if e.startswith("--")]  # a later --config wins over the first
    overrides = [e for e in extra if not e.startswith("--")]
    return ["--config", "configs/demo.yaml", *options, *vlguard_overrides(files, run_dir), "trainer.max_steps=2",
            *overrides]


def _evaluate_args(data: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return ["--config", str(REPO / "configs/evaluate/tiny_smoke.yaml"), f"evaluate.data_dir={data}",
            f"evaluate.attack_dir={data / 'attacks'}", f"run_dir={run_dir}", "model.tiny.hidden_size=32",
            "model.tiny.num_layers=1", "model.tiny.vision_hidden_size=32", "evaluate.bootstrap=10", *extra]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, the lock file included: a refused run leaves none behind."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _log_to_current_stderr() -> None:
    """Library loggers hold the stderr of the test that imported them (closed since): point their
    handlers at this test's, so their lines are captured rather than reported as logging errors."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one


def invoke(main, argv: list[str], capfd) -> tuple[int, str]:
    _log_to_current_stderr()
    capfd.readouterr()
    try:
        code = main(argv)
        code = code if isinstance(code, int) else 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, capfd.readouterr().err


CASES = [("fit", c) for c in FIT_CONFIG + FIT_DATA + FIT_RUN] + [("evaluate", c) for c in EVALUATE] + \
    [("audit", c) for c in AUDIT] + [("rewrite", c) for c in REWRITE] + [("benchmarks", c) for c in BENCHMARKS] + \
    [("fit-argv", ("experiment_config_on_a_laptop", _no_gpu, GPU_ON_A_LAPTOP,
                   "trainer.accelerator=gpu but torch finds no CUDA GPU on this machine; add trainer=cpu"))]


@pytest.mark.parametrize("command, case", CASES, ids=[c[0] for _, c in CASES])
def test_bad_input_fails_in_one_line(command, case, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SAFETY_MIRAGE_RUN_DIR", raising=False)
    monkeypatch.chdir(REPO)
    name, corrupt, extra, expected = case
    _PATCH[:] = [monkeypatch]
    data, run_dir = tmp_path / "data", tmp_path / "run"
    files = write_vlguard(data)
    (data / "attacks").mkdir()
    for attack in ("test_what_3shot.json", "test_share_1shot.json"):
        (data / "attacks" / attack).write_bytes((data / "test.json").read_bytes())
    # A finished run already lives in the run dir: a failed run must leave it as it was.
    for rel, content in EARLIER.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(content)
    corrupt(data)
    before = snapshot(run_dir)
    extra = [e.replace("{data}", str(data)).replace("{run}", str(run_dir)) for e in extra]
    try:
        if command == "fit":
            from lightning_modules.fit import main

            status, stderr = invoke(main, _fit_args(data, run_dir, files, extra), capfd)
        elif command == "evaluate":
            from lightning_modules.evaluate import main

            status, stderr = invoke(main, _evaluate_args(data, run_dir, extra), capfd)
        elif command == "fit-argv":
            from lightning_modules.fit import main

            status, stderr = invoke(main, extra, capfd)
        elif command == "benchmarks":
            from core.errors import cli_main
            from datamodules.benchmarks.__main__ import main

            status, stderr = invoke(cli_main(main), extra, capfd)
        elif command == "rewrite":
            from attacks.rewrite import main

            status, stderr = invoke(main, extra, capfd)
        else:
            from attacks.audit import main

            status, stderr = invoke(main, extra, capfd)
        after = snapshot(run_dir)  # before a lock this test holds is released (and its file removed)
    finally:
        while _HELD:
            _HELD.pop().release()
    assert status == 2, f"exit {status}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, stderr[-3000:]
    assert expected.replace("{data}", str(data)).replace("{run}", str(run_dir)) in errors[0], errors[0]
    assert after == before  # nothing already written is changed or lost, and no lock file is left behind
    assert not (run_dir / "model").exists() and not (run_dir / "tensorboard").exists()


def test_the_table_covers_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.slow
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


def test_encodings_are_told_apart(tmp_path):
    """UTF-8 with a byte-order mark is fine; UTF-16 and Latin-1 are named."""
    from core.errors import UserError
    from core.records import read_json_list

    path = tmp_path / "x.json"
    path.write_bytes(codecs.BOM_UTF8 + b'[{"id": 1}]')
    assert read_json_list(path) == [{"id": 1}]
    for data, message in ((b'[{"a": "caf\xe9"}]', r"not UTF-8 text \(byte 0xe9 at line 1"),
                          ('[{"a": 1}]'.encode("utf-16"), "UTF-16")):
        path.write_bytes(data)
        with pytest.raises(UserError, match=message):
            read_json_list(path)


# -- a full disk behind every writer ----------------------------------------------------------------
# Each case writes something first (a file a user would not want to lose), then fills the disk
# (`faults.full_disk`: every write through `core.files` fails with ENOSPC) and writes again: one
# line naming what was being written and where, and every earlier file byte for byte as it was.
def _rows(*ids: str) -> list[dict]:
    return [json.loads(SAMPLE) | {"id": i} for i in ids]


def _samples_append(tmp: Path):
    from metrics.samples import append_samples

    append_samples(tmp / "samples.jsonl", _rows("a"))
    return lambda: append_samples(tmp / "samples.jsonl", _rows("b", "c"))


def _samples_rewrite(tmp: Path):
    from metrics.samples import write_samples

    write_samples(tmp / "samples.jsonl", _rows("a"))
    return lambda: write_samples(tmp / "samples.jsonl", _rows("a", "b"))


def _judge_cache(tmp: Path):
    from metrics.vlm_judge import VLMJudge

    judge = VLMJudge.__new__(VLMJudge)  # the cache alone: no judge model is needed to append to it
    judge.cache_path = tmp / "judge_cache.jsonl"
    judge._append_cache([{"key": "k1", "verdict": "relevant", "output": "yes"}])
    return lambda: judge._append_cache([{"key": "k2", "verdict": "irrelevant", "output": "no"}])


def _evaluate_outputs(tmp: Path):
    import pandas as pd

    from lightning_modules.analysis.evaluation import write_outputs

    table = pd.DataFrame({"eval_set": ["unsafe_clean"], "asr": [0.5]})
    write_outputs(tmp, _rows("a"), [], table, {}, {"n_generations": 1}, "report")
    return lambda: write_outputs(tmp, _rows("a", "b"), [], table, {}, {"n_generations": 2}, "report 2")


def _fingerprint(tmp: Path):
    from lightning_modules.analysis.evaluation import check_fingerprint

    return lambda: check_fingerprint(tmp, {"model": "tiny"})


def _figure(tmp: Path):
    from lightning_modules.experiments.plots import _plt, _save

    def draw():
        plt = _plt()
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        _save(plt, fig, tmp / "asr.png", "ASR")
    draw()
    return draw


def _world(match: str):
    def build(tmp: Path):
        from datamodules.mirage_world import WorldConfig, build_world

        small = dict(n_base=4, n_safety=4, n_val=2, n_test=2)
        build_world(WorldConfig(**small), tmp / "worlds")  # an earlier world: must stay whole
        return lambda: build_world(WorldConfig(**small, seed=1), tmp / "worlds")
    return build


def _prepared_vlguard(tmp: Path):
    from datamodules.vlguard import _write

    _write(tmp / "train.json", [{"id": "a"}])
    return lambda: _write(tmp / "train.json", [{"id": "a"}, {"id": "b"}])


def _sample_log(tmp: Path):
    from types import SimpleNamespace

    from lightning_modules.methods.sample_log import log_samples

    logger = SimpleNamespace(log_dir=str(tmp))  # a logger with a folder (CSV): JSON lines there
    samples = {"unsafe_clean": [{"prompt": "q", "response": "a", "image": None}]}
    log_samples([logger], "val", samples, step=1)
    return lambda: log_samples([logger], "val", samples, step=2)


def _checkpoint_file(tmp: Path):
    from lightning_modules.run.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, tmp / "last.ckpt")
    return lambda: io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, tmp / "last.ckpt")


def _fit_results(tmp: Path):
    from lightning_modules.run.training import write_results
    from test_resume import _Results

    write_results(tmp, _Results())
    return lambda: write_results(tmp, _Results())


def _model_card(tmp: Path):
    from core.files import atomic_write

    (tmp / "model").mkdir()
    return lambda: atomic_write(tmp / "model" / "README.md", "# card", what="model card")


def _converted_benchmark(tmp: Path):
    from benchmark_fixtures import save_image, write_json
    from datamodules.benchmarks.__main__ import convert
    from benchmark_fixtures import MMSB_QUESTION

    root = tmp / "MM-SafetyBench"
    write_json(root / "data" / "processed_questions" / "01-Illegal_Activitiy.json", {"0": MMSB_QUESTION})
    save_image(root / "data" / "imgs" / "01-Illegal_Activitiy" / "SD" / "0.jpg")
    convert("mm_safetybench", str(root), tmp / "mmsb.json", variant="SD")
    return lambda: convert("mm_safetybench", str(root), tmp / "mmsb.json", variant="SD")


# (case id, write something, then return the write that meets the full disk; what the line must say)
WRITERS = [
    ("enospc_samples_append", _samples_append, "cannot write samples {tmp}/samples.jsonl: No space left on device (disk full)"),
    ("enospc_samples_rewrite", _samples_rewrite, "cannot write samples {tmp}/samples.jsonl: No space left on device"),
    ("enospc_judge_cache_append", _judge_cache, "cannot write judge cache {tmp}/judge_cache.jsonl: No space left"),
    ("enospc_evaluate_results", _evaluate_outputs, "cannot write samples {tmp}/samples.jsonl: No space left"),
    ("enospc_generation_fingerprint", _fingerprint, "cannot write generation fingerprint {tmp}/generation.json"),
    ("enospc_compare_figure", _figure, "cannot write figure {tmp}/asr.png: No space left on device (disk full)"),
    ("enospc_world_images", _world(".png"), "cannot write world image {tmp}/worlds/"),
    ("enospc_world_files", _world(".json"), "cannot write world file {tmp}/worlds/"),
    ("enospc_prepared_vlguard", _prepared_vlguard, "cannot write prepared VLGuard file {tmp}/train.json"),
    ("enospc_sample_log", _sample_log, "cannot write sample log {tmp}/val_samples.jsonl: No space left"),
    ("enospc_checkpoint", _checkpoint_file, "cannot write checkpoint {tmp}/last.ckpt: No space left on device "
                                            "(disk full); the last complete checkpoint is kept"),
    ("enospc_fit_results", _fit_results, "cannot write results {tmp}/results.csv: No space left on device"),
    ("enospc_model_card", _model_card, "cannot write model card {tmp}/model/README.md: No space left"),
    ("enospc_converted_benchmark", _converted_benchmark,
     "cannot write converted benchmark file {tmp}/mmsb.json: No space left on device (disk full)"),
]


@pytest.mark.parametrize("name, prepare, expected", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_disk_is_one_line_and_loses_nothing(name, prepare, expected, tmp_path, monkeypatch):
    from core.errors import UserError

    write = prepare(tmp_path)
    before = snapshot(tmp_path)
    match = {"enospc_world_images": ".png", "enospc_world_files": ".json"}.get(name, "")
    full_disk(monkeypatch, match=match)
    with pytest.raises(UserError) as err:
        write()
    line = str(err.value)
    assert "\n" not in line and expected.replace("{tmp}", str(tmp_path)) in line, line
    after = {k: v for k, v in snapshot(tmp_path).items() if not Path(k).name.startswith(".") or k in before}
    assert after == before  # earlier files whole; no temp file, no half line, no half-built cache entry left
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_new_tables_add_thirty_cases():
    added = [c for c in CASES if c[1][0] in NEW_CASES] + [w for w in WRITERS]
    assert len(added) >= 30


NEW_CASES = {"interpolation_cycle", "interpolation_cycle_in_a_section", "interpolation_of_a_missing_key",
             "seed_not_a_number", "config_file_missing", "gpu_trainer_without_a_gpu", "cuda_accelerator_without_a_gpu",
             "resume_checkpoint_truncated", "resume_checkpoint_empty", "run_dir_is_a_file", "tensorboard_disk_full",
             "evaluate_samples_stray_line", "evaluate_samples_stray_line_after_samples",
             "evaluate_samples_line_not_an_object", "evaluate_samples_not_utf8", "evaluate_gpu_without_a_gpu",
             "evaluate_interpolation_cycle", "audit_file_missing", "rewrite_output_is_a_directory", "rewrite_disk_full",
             "rewrite_input_latin1", "experiment_config_on_a_laptop", "benchmarks_convert_path_missing",
             "benchmarks_convert_unknown_variant", "benchmarks_convert_output_is_a_directory",
             "benchmarks_convert_disk_full"}
