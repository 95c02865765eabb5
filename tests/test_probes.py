"""Knowledge probes: the pure math (per-answer NLL, first-token log-odds, attribution), settings
validation, and (slow) the probes on a tiny run: relearning works on a copy of the weights."""

import math

import pytest
import torch

from core.errors import UserError
from lightning_modules.config.loading import load_config
from lightning_modules.analysis.probes import parse_probe_settings
from losses.nll import mean_token_nll
from metrics.attribution import refusal_log_odds, summarize_attribution


def test_mean_token_nll_is_per_answer_mean_and_nan_without_labels():
    logits = torch.zeros(2, 4, 5)  # uniform: every token costs log 5
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, -100]])
    out = mean_token_nll(logits, labels)
    assert out[0].item() == pytest.approx(math.log(5)) and math.isnan(out[1].item())


def test_refusal_log_odds_sums_refusal_tokens_against_the_answer_token():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    value = refusal_log_odds(logits, refusal_ids=[0, 1], comply_ids=torch.tensor([3]))
    assert value.item() == pytest.approx(math.log(0.3 / 0.4))


def test_attribution_is_the_drop_in_log_odds_when_a_part_is_occluded():
    out = summarize_attribution([2.0, 4.0], {"first_word": [1.0, 1.0], "image": [2.0, 4.0]})
    assert out["first_word"]["mean"] == pytest.approx(2.0) and out["first_word"]["sd"] == pytest.approx(math.sqrt(2))
    assert out["image"]["mean"] == 0.0 and out["log_odds"]["mean"] == 3.0 and out["image"]["n"] == 2


@pytest.mark.parametrize("override, message", [
    ("probes.relearn_step=3", "unknown config key 'probes.relearn_step'"),
    ("probes.relearn_steps=-1", r"'probes.relearn_steps': -1 \(allowed: an integer >= 0\)"),
    ("probes.max_queries=0", "'probes.max_queries': 0"),
    ("probes.relearn_lr=0", "'probes.relearn_lr': 0.0"),
])
def test_bad_probe_settings_are_one_line(override, message):
    with pytest.raises(UserError, match=message):  # rejected when the config is loaded
        parse_probe_settings(load_config("configs/demo.yaml", [override]))


@pytest.mark.slow
def test_probes_on_a_tiny_run_leave_the_model_untouched(small_overrides):
    from lightning_modules.run.assembly import build_run
    from lightning_modules.analysis.probes import Prober, parse_probe_settings

    cfg = load_config("configs/experiment/mirage_sft.yaml", small_overrides + ["probes.relearn_steps=3"])
    module, data = build_run(cfg)
    prober = Prober(cfg, module, data, parse_probe_settings(cfg))
    sets = data.eval_split(data.files.test)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    nll = prober.hazard_nll(module.model, sets["unsafe_clean"])
    assert len(nll) == len(sets["unsafe_clean"]) and all(v > 0 for v in nll)
    hazard, benign = prober.relearn_rows({e.id for e in sets["unsafe_clean"]}, {e.image for e in sets["unsafe_clean"]})
    assert hazard and benign and not {e.id for e in hazard} & {e.id for e in sets["unsafe_clean"]}
    assert all(e.response == e.extra["harmful_response"] for e in hazard)
    asr = prober.relearn(hazard, sets["unsafe_clean"])
    assert 0.0 <= asr <= 1.0
    attribution = prober.attribution(module.model, {k: v[:4] for k, v in sets.items()})
    assert {"log_odds", "first_word", "image", "rest", "end_mark"} <= set(attribution["unsafe_clean"])
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # relearning trained a copy
