"""Every method's options: the schema and the Method class agree, bad values and combinations are refused."""

import pytest
import yaml

from flattengpt.config import ConfigError, validate_config
from flattengpt.methods import METHODS, MethodError, get_method, method_class

from .models_for_tests import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def config_with(methods: dict, targets: dict | None = None) -> dict:
    return {"models": {"m": {"source": "embedded", "name": "smollm2-135m-instruct"}},
            "calibration": {"c": {"source": "embedded", "name": "shakespeare-calibration"}},
            "targets": targets or {"t": {"remove_blocks": 3}}, "methods": methods}


@pytest.mark.parametrize("name", list(METHODS))
def test_schema_defaults_equal_the_method_defaults(name):
    """The schema fills in exactly the Method's OPTIONS: the documented defaults are the ones that run."""
    config = validate_config(config_with({"x": {"method": name}}), SCHEMA)
    filled = {k: v for k, v in config["methods"]["x"].items() if k != "method"}
    cls = method_class(name)
    assert filled == cls.OPTIONS
    assert set(cls.CHOICE_OPTIONS) <= set(cls.OPTIONS)
    assert cls.chooses_with in ("similarity", "model")
    # the choice and the build see disjoint options, together all of them
    spec = {"method": name, **cls.OPTIONS}
    assert set(cls.choice_options(spec)) | set(cls.fit_options(spec)) == set(cls.OPTIONS)
    assert not set(cls.choice_options(spec)) & set(cls.fit_options(spec))


def test_fit_options_never_reach_methods_without_a_fit():
    """drop, shortgpt, gromov, sleb, laco, slm have no fit options: nothing of another method reruns them."""
    for name in ("drop", "shortgpt", "gromov", "sleb", "laco", "slm", "flatten-only"):
        cls = method_class(name)
        assert cls.fit_options({"method": name, **cls.OPTIONS}) == {}
        assert not cls.fits
    assert method_class("flattengpt").fits and method_class("replaceme").fits
    assert method_class("flattengpt").choice_options({"lambda_factor": 1.0}) == {}


@pytest.mark.parametrize("spec,message", [
    ({"method": "drop", "lambda_factor": 1.0}, "lambda_factor"),
    ({"method": "sleb", "samples": 0}, "samples"),
    ({"method": "laco", "rule": "average"}, "rule"),
    ({"method": "replaceme", "lambda_factor": -1}, "lambda_factor"),
    ({"method": "flattengpt", "compensation_target": "both"}, "compensation_target"),
])
def test_bad_options_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(config_with({"x": spec}), SCHEMA)


def test_unknown_options_are_refused_in_python_too():
    with pytest.raises(MethodError, match="unknown option.*lambda_factor"):
        get_method({"method": "shortgpt", "lambda_factor": 1.0})


def test_plan_file_is_for_the_flattening_methods_only(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"groups": [[1, 2]]}))
    config = config_with({"f": {"method": "flattengpt"}, "s": {"method": "shortgpt"}},
                         {"byhand": {"plan_file": str(plan)}})
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert len(error.value.errors) == 1 and "targets.byhand.plan_file" in error.value.errors[0]
    assert "'s' (shortgpt)" in error.value.errors[0]


def test_block_limits_of_each_method_are_checked_before_any_job():
    """SmolLM2 has 30 blocks: SLEB with both protections removes at most 28, LaCo from block 20 up a few."""
    ok = validate_config(config_with({"s": {"method": "sleb"}}, {"t": {"remove_blocks": 28}}), SCHEMA)
    assert ok["methods"]["s"]["protect_first"] is True
    with pytest.raises(ConfigError, match=r"targets\.t\.remove_blocks: 29 .* methods\.s \(sleb, at most 28"):
        validate_config(config_with({"s": {"method": "sleb"}}, {"t": {"remove_blocks": 29}}), SCHEMA)
    with pytest.raises(ConfigError, match=r"methods\.l \(laco"):
        validate_config(config_with({"l": {"method": "laco", "lowest": 20}}, {"t": {"remove_blocks": 12}}), SCHEMA)


def test_similarity_views_read_the_files_the_similarity_stage_writes(tmp_path):
    """The BI column (not its rank), the matrices as saved; ShortGPT records the values it chose by."""
    import numpy as np

    from flattengpt.methods import SimilarityViews
    from flattengpt.similarity import block_influence, block_influence_table, save_matrix

    rng = np.random.default_rng(0)
    S = np.clip(1 - np.abs(rng.normal(0, 0.2, (6, 6))), 0, 1)
    S = (S + S.T) / 2
    np.fill_diagonal(S, 1.0)
    labels = [f"X{i}" for i in range(6)]
    save_matrix(S, labels, tmp_path / "cosine.csv")
    save_matrix(1 - S, labels, tmp_path / "angular_distance.csv")
    bi = block_influence(S)
    block_influence_table(bi).to_csv(tmp_path / "block_influence.csv", index=False)
    views = SimilarityViews.load(tmp_path / "cosine.csv", tmp_path / "angular_distance.csv",
                                 tmp_path / "block_influence.csv")
    assert np.allclose(views.block_influence, 1 - np.diag(S, 1)) and np.allclose(views.cosine, S)
    plan = get_method({"method": "shortgpt"}).choose(2, views=views)
    chosen = {step["block"]: step["block_influence"] for step in plan.steps if step["removed"]}
    assert sorted(chosen) == sorted(np.argsort(bi, kind="stable")[:2].tolist())
    assert np.allclose(list(chosen.values()), sorted(bi)[:2])
