"""The methods comparison's resumable driver (benchmarks/methods_comparison/run.py): its units and configs.

run.py turns the benchmark config into units and one narrowed config per unit; a wrong narrowing
would silently change a job's params (and rerun or mislabel results), so it is checked here
without running Snakemake.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "methods_comparison" / "run.py"
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture
def run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mc_run", DRIVER)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mc_run", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)      # derived configs and runs/ in a scratch directory
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    return module


def test_recovered_models_are_phase_4_units_after_everything_else(run):
    config = run.load_config(run.CONFIG)
    units = run.all_units(config)
    phase4 = [u for u in units if u.phase == 4]
    assert [u.name for u in phase4] == ["ppl wikitext2-seed0/remove-6/flattengpt+alpaca",
                                        "zs wikitext2-seed0/remove-6/flattengpt+alpaca",
                                        "ppl wikitext2-seed0/remove-6/shortgpt+alpaca",
                                        "zs wikitext2-seed0/remove-6/shortgpt+alpaca"]
    assert units[-4:] == phase4
    ppl = phase4[0]
    assert (ppl.source, ppl.recovery, ppl.source_variant) == ("flattengpt", "alpaca", "wikitext2-seed0/remove-6/flattengpt")
    base = "results/smollm2-135m-mc/wikitext2-seed0/remove-6"
    # the plan is the source's; the tuning's record and curve are collected with the perplexity unit
    assert f"{base}/flattengpt/plan.json" in ppl.required
    assert f"{base}/flattengpt+alpaca/model/recovery.json" in ppl.required
    assert f"{base}/flattengpt+alpaca/eval/perplexity/tinyshakespeare.json" in ppl.targets
    # the source checkpoint stays in results/ until the recovered model's units are collected
    assert ppl.needs == [f"{base}/flattengpt+alpaca/model", f"{base}/flattengpt/model"]
    assert run.all_units(config, ["shortgpt+alpaca"]) == phase4[2:]


def test_a_units_config_keeps_only_its_method_and_recovery(run):
    config = run.load_config(run.CONFIG)
    units = {u.name: u for u in run.all_units(config)}
    recovered = yaml.safe_load(run.derived_config(config, units["zs wikitext2-seed0/remove-6/shortgpt+alpaca"]).read_text())
    assert list(recovered["methods"]) == ["shortgpt"] and list(recovered["calibration"]) == ["wikitext2-seed0"]
    setting = recovered["recovery"]["alpaca"]
    assert setting["methods"] == ["shortgpt"] and setting["targets"] == ["remove-6"]
    # how it tunes is untouched: the recover job's params are those of the full config
    how = {k: v for k, v in config["recovery"]["alpaca"].items() if k not in ("methods", "targets")}
    assert {k: v for k, v in setting.items() if k not in ("methods", "targets")} == how
    # a unit of an unrecovered method gets no recovery setting (its methods would not exist there)
    plain = yaml.safe_load(run.derived_config(config, units["ppl wikitext2-seed1/remove-3/drop"]).read_text())
    assert plain["recovery"] == {} and list(plain["methods"]) == ["drop"]
    assert plain["methods"]["drop"] == config["methods"]["drop"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (the benchmark's calibration and Alpaca files)")
def test_the_recovered_units_config_is_valid(run, monkeypatch):
    from flattengpt.config import validate_config

    monkeypatch.chdir(REPO)  # the config's ../shared paths are relative to the repository root
    config = run.load_config(run.CONFIG)
    unit = next(u for u in run.all_units(config) if u.recovery)
    derived = yaml.safe_load(run.derived_config(config, unit).read_text())
    validated = validate_config(json.loads(json.dumps(derived)), REPO / "workflow" / "schemas" / "config.schema.yaml",
                                dry_run=True)
    assert validated["recovery"]["alpaca"]["max_steps"] == 25


def study_config() -> dict:
    """A levers-study-like config: a seed replica, a calibration that differs in size, methods per run."""
    calib = {"source": "local", "path": "text.txt", "n_samples": 4, "seq_len": 16, "seed": 0}
    return {
        "models": {"m": {"source": "embedded", "name": "smollm2-135m-instruct"}},
        "calibration": {"c0": calib, "c1": {**calib, "seed": 1}, "big0": {**calib, "n_samples": 16},
                        "big1": {**calib, "n_samples": 16, "seed": 1}},
        "targets": {"k3": {"remove_blocks": 3}, "k6": {"remove_blocks": 6}},
        "methods": {"a": {"method": "drop"}, "b": {"method": "shortgpt"}},
        "runs": [{"model": "m", "calibration": c, "target": t, **({} if c.startswith("c") else {"methods": ["b"]})}
                 for c in ("c0", "c1", "big0", "big1") for t in ("k3", "k6")],
        "evaluation": {"perplexity": {"corpora": {"wiki": {"source": "local", "path": "w.txt"}}},
                       "zero_shot": {"tasks": ["piqa"]}},
    }


def test_runs_methods_and_seed_replicas_decide_the_units(run):
    config = study_config()
    assert run.seed_replicas(config) == {"c1", "big1"}   # big0 differs from c0 in size: not a replica
    units = run.all_units(config)
    names = [u.name for u in units]
    # phase 1: every calibration that is not a seed replica; its methods only where runs: names them
    assert [u.name for u in units if u.phase == 1] == [
        "ppl dense", "ppl c0/k3/a", "ppl c0/k3/b", "ppl c0/k6/a", "ppl c0/k6/b", "ppl big0/k3/b", "ppl big0/k6/b"]
    assert [u.name for u in units if u.phase == 2] == [
        "ppl c1/k3/a", "ppl c1/k3/b", "ppl c1/k6/a", "ppl c1/k6/b", "ppl big1/k3/b", "ppl big1/k6/b"]
    # zero-shot on one seed: never on a replica
    assert [u.name for u in units if u.phase == 3] == [
        "zs dense", "zs c0/k3/a", "zs c0/k3/b", "zs c0/k6/a", "zs c0/k6/b", "zs big0/k3/b", "zs big0/k6/b"]
    assert not any("big0/k3/a" in n or "big1/k6/a" in n for n in names)
    # a unit's config has the one method and calibration, and no runs: left that names others
    derived = yaml.safe_load(run.derived_config(config, units[-1]).read_text())
    assert list(derived["calibration"]) == ["big0"] and list(derived["methods"]) == ["b"] and derived["runs"] is None


def test_locks_of_a_live_snakemake_are_left_in_place(run, tmp_path, monkeypatch):
    """Another benchmark's driver may be running Snakemake on the same results/<model>/: its locks are not
    stale; those of a killed run beside it are."""
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    live, killed = "results/m/c0/k3/a/eval/perplexity/w.json", "results/m/c0/k6/b/eval/perplexity/w.json"
    for n, target in ((0, live), (1, killed)):
        (locks / f"{n}.input.lock").write_text("results/m/model.json\n")
        (locks / f"{n}.output.lock").write_text(f"results/m/c0/k/x/model\n{target}\n")
    (locks / "2.input.lock").write_text("results/other/x.json\n")
    (locks / "2.output.lock").write_text("results/other/y.json\n")
    monkeypatch.setattr(run, "live_snakemake_targets", lambda: {live, "results/m/c0/k3/a/eval/generations.json"})
    run.clear_stale_locks("m")
    assert sorted(p.name for p in locks.iterdir()) == ["0.input.lock", "0.output.lock", "2.input.lock", "2.output.lock"]
    monkeypatch.setattr(run, "live_snakemake_targets", lambda: set())
    run.clear_stale_locks("m")
    assert sorted(p.name for p in locks.iterdir()) == ["2.input.lock", "2.output.lock"]


def test_the_levers_choice_reads_only_the_selection_score_of_complete_settings(monkeypatch):
    """The levers study picks the setting of lowest mean log selection score over every target, complete ones only."""
    spec = importlib.util.spec_from_file_location("levers_summarize", REPO / "benchmarks" / "flattengpt_levers" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "levers_summarize", module)
    spec.loader.exec_module(module)
    calib = {"source": "local", "path": "t.txt", "n_samples": 4, "seq_len": 8}
    config = {"calibration": {"w-seed0": {**calib, "seed": 0}, "w-seed1": {**calib, "seed": 1}},
              "targets": {"k3": {"remove_blocks": 3}, "k6": {"remove_blocks": 6}}}
    assert module.families(config) == {"w": ["w-seed0", "w-seed1"]}
    nan = float("nan")

    def row(setting, target, selection, reported, seeds=2):
        return {"setting": setting, "target": target, "family": "w", "selection": (selection, nan),
                "selection_seeds": seeds, "wikitext2-test": (reported, nan), "tinyshakespeare": (reported, nan)}

    rows = [row("a", "k3", 10, 1), row("a", "k6", 40, 1),       # best reported, worse selection: 20 (geo mean)
            row("b", "k3", 16, 9), row("b", "k6", 16, 9),       # 16
            row("c", "k3", 2, 9), row("c", "k6", 2, 9, seeds=1)]  # best selection, one seed missing at k6
    chosen, ranked = module.choose(rows, config)
    assert chosen == "b" and [name for name, _ in ranked] == ["b", "a"]


def test_checkpoints_are_kept_while_another_snakemake_works_here(run, tmp_path, monkeypatch):
    config = study_config()
    unit = next(u for u in run.all_units(config) if u.kind == "ppl" and u.method != "dense")
    (tmp_path / unit.checkpoint).mkdir(parents=True)
    for path in unit.required:  # collected
        run.runs_path(path).parent.mkdir(parents=True, exist_ok=True)
        run.runs_path(path).write_text("{}")
    monkeypatch.setattr(run, "live_benchmark_snakemakes", lambda: [4242])
    run.drop_checkpoints([unit])
    assert (tmp_path / unit.checkpoint).is_dir()
    monkeypatch.setattr(run, "live_benchmark_snakemakes", lambda: [])
    run.drop_checkpoints([unit])
    assert not (tmp_path / unit.checkpoint).exists()
