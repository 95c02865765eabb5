"""The compare command: plan, seed stack, resume, stale rows, results.csv / summary.json contracts
(on fake run directories, no training), and one slow end-to-end comparison at tiny size."""

import io
import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SMALL
from core.errors import UserError
from pathlib import Path

from lightning_modules.experiments import plan as compare_plan, runner
from lightning_modules.experiments.results import COLUMNS, normalized
from lightning_modules.experiments.summary import summarize
from lightning_modules.config.loading import load_config, to_yaml
from metrics.tables import t_interval, wilson_interval

REQUIRED = ["method", "world_seed", "seed", "asr_clean", "asr_attacked", "asr_neutral", "rr_clean", "rr_rewritten",
            "rr_neutral", "ir_attacked", "accuracy", "hazard_nll_clean", "hazard_nll_attacked", "asr_relearn"]


class FakeFit:
    """Stands in for fit.run: writes config.yaml, results.json (no neutral sets) and probes.json."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg):
        self.configs.append(cfg)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        world, seed = int(cfg.data.world.seed), int(cfg.seed)
        asr = 0.0 if cfg.name == "unaligned" else 0.1 * (world % 3) + 0.01 * seed
        results = {"unsafe_clean": {"asr": asr, "refusal_rate": 1 - asr, "ir": 0.0, "relevant": asr, "n": 40},
                   "unsafe_attacked": {"asr": asr + 0.2, "refusal_rate": 0.7 - asr, "ir": 0.1, "n": 40},
                   "safe_clean": {"refusal_rate": 0.05, "accuracy": 0.9, "n": 40},
                   "safe_rewritten": {"refusal_rate": 0.3, "accuracy": 0.6, "n": 40}}
        (run_dir / "results.json").write_text(json.dumps(results))
        (run_dir / "results.csv").write_text("eval_set,asr\n")
        probes = {"summary": {"hazard_nll_clean": 1.0 + world, "hazard_nll_attacked": 0.5, "hazard_nll_neutral": None,
                              "asr_before_relearn": 0.0, "asr_relearn": 0.5, "asr_relearn_benign": 0.1, "attr_first_word": 0.3,
                              "attr_image": 0.2, "attr_rest": 0.1},
                  "attribution": {"unsafe_clean": {"first_word": {"mean": 0.3}, "image": {"mean": 0.2},
                                                   "rest": {"mean": 0.1}}},
                  "relearn": {"hazard": {"asr": 0.5, "n_train": 32, "n_eval": 40}}}
        (run_dir / "probes.json").write_text(json.dumps(probes))


@pytest.fixture
def fake_fit(monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(runner.training, "run", fake)
    return fake


def compare_cfg(tmp_path, *overrides):
    return load_config("configs/experiment/mirage_compare.yaml",
                       [f"run_dir={tmp_path / 'cmp'}", f"paths.cache={tmp_path / 'cache'}", "compare.methods=[unaligned,sft,npo]",
                        "compare.seeds=[0,1]", "compare.world_seeds=[0,1]", "compare.base_seeds=[0]", "compare.jobs=1",
                        *overrides])


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_seed_stack_rows_columns_and_base_once_per_world(tmp_path, fake_fit):
    results = runner.run(compare_cfg(tmp_path))
    assert len(results) == 2 + 4 + 4  # unaligned once per world; sft and npo per world x alignment seed
    assert all(c in results.columns for c in REQUIRED)
    unaligned = results[results.method == "unaligned"]
    assert sorted(unaligned.world_seed) == [0, 1] and unaligned.seed.isna().all()
    assert results.asr_neutral.isna().all() and results.rr_neutral.isna().all()  # absent set: NaN, never 0
    sft = results[(results.method == "sft") & (results.world_seed == 1) & (results.seed == 1)].iloc[0]
    assert sft.asr_attacked == pytest.approx(0.31) and sft.hazard_nll_clean == 2.0
    assert sft.relevant_clean == pytest.approx(0.11) and math.isnan(sft.relevant_attacked)
    out = tmp_path / "cmp"
    text = (out / "results.csv").read_text()
    assert pd.read_csv(io.StringIO(text)).equals(results)  # what pandas reads back is what was written
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    summary = pd.DataFrame(json.loads((out / "summary.json").read_text())["rows"]).set_index("method")
    assert summary.loc["sft", "interval"] == "t over 2 worlds"
    # sft's world means of asr_clean: 0.005 (world 0) and 0.105 (world 1); t over the two worlds
    mean, lo, hi = t_interval([0.005, 0.105])
    assert lo < 0 and summary.loc["sft", "asr_clean_hi"] == pytest.approx(hi)
    assert summary.loc["sft", "asr_clean"] == pytest.approx(mean) and summary.loc["sft", "asr_clean_lo"] == pytest.approx(max(lo, 0.0))  # clipped
    assert "| sft | 2 | 4 |" in (out / "summary.md").read_text()
    for name in ("methods.png", "probes.png", "attribution.png"):
        assert (out / name).stat().st_size > 5000


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_command_line_overrides_reach_every_run(tmp_path, fake_fit):
    cfg = compare_cfg(tmp_path, "compare.methods=[unaligned,sft]", "compare.seeds=[0]")
    command_line = ["optim.lr=0.005", "data.world.seed=7", "data.world.compliance_cue=query",
                    "data.world.refusal_cue=provide", "compare.seeds=[0]", f"run_dir={tmp_path / 'cmp'}"]
    results = runner.run(cfg, command_line)
    assert len(fake_fit.configs) == 2 and set(results.world_seed) == {7}
    for run_cfg in fake_fit.configs:
        assert run_cfg.optim.lr == 0.005 and run_cfg.data.world.seed == 7
        assert (run_cfg.data.world.compliance_cue, run_cfg.data.world.refusal_cue) == ("query", "provide")
        assert str(tmp_path / "cmp") in run_cfg.run_dir and run_cfg.run_dir != str(tmp_path / "cmp")


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_world_overrides_apply_per_world_and_the_command_line_wins(tmp_path, fake_fit):
    cfg = compare_cfg(tmp_path, "compare.methods=[sft]", "compare.seeds=[0]", "compare.world_seeds=[0,1]",
                      "compare.world_overrides={1: [data.world.compliance_cue=why, data.world.n_test=30]}")
    runner.run(cfg, ["data.world.n_test=40"])
    by_world = {c.data.world.seed: c.data.world for c in fake_fit.configs}
    assert by_world[1].compliance_cue == "why" and by_world[0].compliance_cue == "what"
    assert by_world[0].n_test == by_world[1].n_test == 40


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_rerun_keeps_rows_refuses_stale_and_redoes_on_request(tmp_path, fake_fit):
    cfg = compare_cfg(tmp_path, "compare.methods=[sft]", "compare.world_seeds=[0]")
    runner.run(cfg)
    assert len(fake_fit.configs) == 2
    runner.run(cfg)  # nothing changed: nothing runs again
    assert len(fake_fit.configs) == 2
    csv = tmp_path / "cmp" / "results.csv"
    table = pd.read_csv(csv)
    table.assign(config_hash="from-older-code").to_csv(csv, index=False)  # e.g. the schema gained a key
    runner.run(cfg)  # no key both configs have changed: the rows are kept under the new hash
    assert len(fake_fit.configs) == 2 and pd.read_csv(csv).config_hash.tolist() == table.config_hash.tolist()
    before = csv.read_text()
    with pytest.raises(UserError, match=r"another run config \(changed: optim.lr\).*on_stale=redo"):
        runner.run(cfg, ["optim.lr=0.01"])
    assert csv.read_text() == before  # refused before anything was written
    results = runner.run(compare_cfg(tmp_path, "compare.methods=[sft]", "compare.world_seeds=[0]",
                                      "compare.on_stale=redo"), ["optim.lr=0.01"])
    assert len(fake_fit.configs) == 4 and all(d.endswith("_1") for d in results.run_dir)
    assert (tmp_path / "cmp" / "sft" / "world0-base0-seed0" / "results.json").is_file()  # the old run is kept


@pytest.mark.parametrize("content, message", [
    ("method,seed,score\nsft,0,0.5\n", "not a results.csv written by this compare"),
    (None, "cut off mid-way"),
    (b"\xff\xfe\x00junk", "not UTF-8"),
])
@pytest.mark.slow  # seconds per case: out of make test-fast
def test_foreign_or_cut_results_csv_is_one_line(tmp_path, fake_fit, content, message):
    cfg = compare_cfg(tmp_path, "compare.methods=[sft]", "compare.world_seeds=[0]", "compare.seeds=[0]")
    csv = tmp_path / "cmp" / "results.csv"
    if content is None:
        runner.run(cfg)
        csv.write_text(csv.read_text()[:-40])
    else:
        csv.parent.mkdir(parents=True)
        csv.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as err:
        runner.run(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_any_dotted_key_is_swept_and_plotted(tmp_path, fake_fit):
    cfg = compare_cfg(tmp_path, "compare.methods=[sft,npo]", "compare.world_seeds=[0]", "compare.seeds=[0]",
                      "compare.sweep_key=optim.lr", "compare.sweep_values=[0.001,0.0001]")
    results = runner.run(cfg)
    assert sorted(c.optim.lr for c in fake_fit.configs) == [0.0001, 0.0001, 0.001, 0.001]
    assert sorted(set(results.sweep)) == [0.0001, 0.001]
    assert (tmp_path / "cmp" / "sweep.png").stat().st_size > 5000
    with pytest.raises(UserError, match="swept by compare.sweep_key"):
        runner.run(cfg, ["optim.lr=0.1"])
    with pytest.raises(UserError, match="list its values in compare.world_seeds"):
        compare_plan.parse_settings(compare_cfg(tmp_path, "compare.sweep_key=data.world.seed", "compare.sweep_values=[1]"))


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_experiment_family_is_a_setting(tmp_path, fake_fit, monkeypatch):
    root = tmp_path / "configs"
    (root / "experiment").mkdir(parents=True)
    for method in ("sft", "npo"):
        (root / "experiment" / f"fam_{method}.yaml").write_text(
            f"defaults: [demo, method/{method}]\nname: fam_{method}\noptim: {{lr: 0.0042}}\n")
    monkeypatch.setattr(compare_plan, "CONFIG_ROOT", root)
    runner.run(compare_cfg(tmp_path, "compare.experiment=fam_{method}", "compare.methods=[sft,npo]",
                            "compare.seeds=[0]", "compare.world_seeds=[0]"))
    assert [(c.method.name, c.optim.lr) for c in fake_fit.configs] == [("sft", 0.0042), ("npo", 0.0042)]
    with pytest.raises(UserError, match=r"unknown method 'ga' .*no configs/experiment/fam_ga.yaml"):
        runner.run(compare_cfg(tmp_path, "compare.experiment=fam_{method}", "compare.methods=[ga]"))
    with pytest.raises(UserError, match="must contain"):
        compare_plan.parse_settings(compare_cfg(tmp_path, "compare.experiment=mirage_sft"))


def test_unknown_compare_key_is_one_line():
    with pytest.raises(UserError, match="unknown config key 'compare.metods'"):  # found by load_config
        compare_plan.parse_settings(load_config("configs/experiment/mirage_compare.yaml", ["compare.metods=[sft]"]))


def test_one_run_gets_wilson_and_intervals_match_scipy():
    lo, hi = wilson_interval(0.25, 40)
    assert 0.13 < lo < 0.25 < hi < 0.42
    mean, lo, hi = t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and hi - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    row = {c: math.nan for c in COLUMNS} | {"method": "sft", "world_seed": 0, "seed": 0, "asr_clean": 0.25,
                                                    "n_unsafe_clean": 40, "asr_attacked": 0.5}
    summary = summarize(normalized([row]))
    assert summary.loc[0, "interval"] == "Wilson, one run"
    assert summary.loc[0, "asr_clean_lo"] == pytest.approx(wilson_interval(0.25, 40)[0])


def test_mirage_compare_configs_parse():
    for name in ("mirage_compare", "mirage_compare_quick", "mirage_sweep_rho", "mirage_compare_slurm"):
        cfg = load_config(f"configs/experiment/{name}.yaml")
        settings = compare_plan.parse_settings(cfg)
        assert settings.methods and (settings.world_seeds is None or len(settings.world_seeds) >= 1)


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_jobs_fall_back_to_one_process_where_workers_cannot_start(tmp_path, fake_fit, monkeypatch, capsys):
    monkeypatch.setattr(runner, "process_pool_available", lambda: "no POSIX semaphores")
    results = runner.run(compare_cfg(tmp_path, "compare.jobs=2", "compare.methods=[unaligned,sft]", "compare.seeds=[0]"))
    assert len(results) == 4 and len(fake_fit.configs) == 4  # all ran, in this process
    assert "cannot start here (no POSIX semaphores); running the runs one after another" in capsys.readouterr().out


def test_parallel_runs_start_one_run_per_world_first():
    from lightning_modules.experiments.parallel_runs import interleave

    keys = compare_plan.plan(compare_plan.parse_settings(compare_cfg(Path("/unused"))), [])
    order = interleave(keys, lambda k: (k.world_seed, k.base_seed))
    assert sorted(order, key=keys.index) == keys  # the same runs
    assert [(k.method, k.world_seed) for k in order[:2]] == [("unaligned", 0), ("unaligned", 1)]  # two bases build at once
    assert [k.world_seed for k in order] == [0, 1] * 5


@pytest.mark.slow
def test_compare_end_to_end_tiny(tmp_path_factory):
    """Two runs at once, each in its own process: a failing run names itself and its log, stops the
    plan, and keeps what finished; the rerun resumes it and each row is its run's own results.json."""
    out = tmp_path_factory.mktemp("compare")
    cache = tmp_path_factory.getbasetemp() / "cache"
    small = [o for o in SMALL if not o.startswith("data.world.")]
    settings = [f"compare.overrides=[{','.join(small)}]", "compare.methods=[unaligned,sft]", "compare.seeds=[0]",
                "compare.base_seeds=[0]", "compare.jobs=2", f"run_dir={out}", f"paths.cache={cache}"]
    world = [o for o in SMALL if o.startswith("data.world.")]
    probes = ["eval.probes=true", "probes.relearn_steps=2", "probes.max_queries=6"]
    broken = load_config("configs/experiment/mirage_compare.yaml", settings + [
        "compare.world_seeds=[0,5]", "compare.world_overrides={5: [model.name_or_path=/nonexistent/model]}"])
    with pytest.raises(UserError, match=r"run \(method=unaligned, world_seed=5, base_seed=0\) failed: .*nonexistent"):
        runner.run(broken, world + probes)
    log = out / "logs" / "unaligned" / "world5-base0.log"
    assert "nonexistent" in log.read_text()  # the run's own output went to its log
    kept = pd.read_csv(out / "results.csv")
    # Order: unaligned w0, unaligned w5, sft w0, sft w5. World 0's runs that finished are kept (sft w0 may have
    # started if unaligned w0 finished before unaligned w5 failed); nothing starts after the failure.
    assert list(kept.method[:1]) == ["unaligned"] and set(kept.world_seed) == {0} and len(kept) <= 2
    assert not (out / "logs" / "sft" / "world5-base0-seed0.log").exists()

    cfg = load_config("configs/experiment/mirage_compare.yaml", settings + ["compare.world_seeds=[0]"])
    results = runner.run(cfg, world + probes)
    assert list(results.method) == ["unaligned", "sft"] and all(c in results.columns for c in REQUIRED)
    assert results.wall_s[0] == kept.wall_s[0]  # resumed, not run again
    for _, row in results.iterrows():  # each row is the run's own results.json
        run = json.loads((out / row.run_dir / "results.json").read_text())
        assert row.asr_attacked == pytest.approx(run["unsafe_attacked"]["asr"])
        assert row.rr_rewritten == pytest.approx(run["safe_rewritten"]["refusal_rate"])
        assert OmegaConf.load(out / row.run_dir / "config.yaml").data.world.n_base == 120
        assert math.isfinite(row.hazard_nll_clean) and math.isfinite(row.asr_relearn)
    assert (out / "methods.png").stat().st_size > 5000 and (out / "probes.png").stat().st_size > 5000


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_runs_finished_after_compare_stopped_are_recorded_not_rerun(tmp_path, fake_fit, capsys):
    """A Slurm job outlives a compare stopped while waiting: its run marks itself finished
    (compare_run.json with its config hash) and the next compare records it without running it."""
    cfg = compare_cfg(tmp_path, "compare.methods=[sft]", "compare.world_seeds=[0]", "compare.seeds=[0]")
    first = runner.run(cfg)
    (tmp_path / "cmp" / "results.csv").unlink()  # as if compare had died before recording it
    again = runner.run(cfg)
    assert len(fake_fit.configs) == 1 and "after the last compare: recorded" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, first)
    (tmp_path / "cmp" / "results.csv").unlink()
    changed = runner.run(cfg, ["optim.lr=0.01"])
    assert len(fake_fit.configs) == 2 and list(changed.run_dir) == ["sft/world0-base0-seed0_1"]  # another config
