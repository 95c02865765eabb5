"""Bad values of the fidelity settings (tests/test_recipe_fidelity.py): one line naming the key, the
value and what is accepted, from the config loader or the fit command before any model is loaded."""

from __future__ import annotations

import pytest

from core.errors import UserError
from lightning_modules.config.loading import load_config

RECIPE = "configs/experiment/vlguard_rmu_full.yaml"
CASES = [
    (["data.overlong=cut"], "unknown data.overlong 'cut'; choose one of: refuse, truncate"),
    (["data.safe_records=pairs"], "unknown data.safe_records 'pairs'; choose one of: rows, conversation"),
    (["data.whole_train_file=maybe"], "invalid value for config key 'data.whole_train_file': 'maybe'"),
    (["optim.projector_lr=0"], "invalid value for config key 'optim.projector_lr': 0.0 (allowed: a number or null > 0)"),
    (["optim.projector_lr=-2e-5"], "invalid value for config key 'optim.projector_lr': -2e-05"),
    (["optim.projector_lr=fast"], "invalid value for config key 'optim.projector_lr': 'fast'"),
    (["data.forget_retain.separate_retain_ce=sometimes"], "config key 'data.forget_retain.separate_retain_ce'"),
    (["data.forget_retain.judge_decoding=beam"],
     "unknown data.forget_retain.judge_decoding 'beam'; choose one of: checkpoint, greedy"),
    (["method.retain_iterator=never"], "unknown method.retain_iterator 'never'; choose one of: restart, once"),
    (["method.retain_iterator=1"], "method.retain_iterator"),
]


@pytest.mark.parametrize("overrides,expected", CASES, ids=[c[0][0] for c in CASES])
def test_bad_fidelity_setting_is_one_line(overrides, expected):
    with pytest.raises(UserError) as err:
        load_config(RECIPE, overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_test_split_val_on_the_whole_training_file_is_refused_before_any_data(capsys, tmp_path):
    from lightning_modules.fit import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", RECIPE, "trainer=cpu", "eval.test_split=val", f"run_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "eval.test_split=val with data.whole_train_file=true" in err
