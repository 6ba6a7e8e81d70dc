"""The real Snakemake workflow, run end to end on tiny real and random models.

Each test works in its own directory with its own config.yaml and calls the Snakemake CLI in a
subprocess, as a user would.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from flattengpt.activations import load_layer
from flattengpt.similarity import load_matrix

from .models_for_tests import REPO, SHARED, STORIES, make_model_with_tokenizer

pytestmark = pytest.mark.workflow

SIMILARITY = ["cosine", "angular_distance", "cka", "block_influence"]
# Every workflow test runs as on an air-gapped cluster: local models, text and task files only.
AIR_GAPPED = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--scheduler", "greedy", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=AIR_GAPPED)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir) -> dict[str, int]:
    """rule -> job count of a dry run."""
    out = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def write_config(workdir, config):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def base_config(model_path, n_samples=6, seq_len=32):
    return {
        "models": {"tiny": {"source": "local", "path": str(model_path)}},
        "calibration": {"plays": {"source": "embedded", "name": "shakespeare-calibration",
                                  "n_samples": n_samples, "seq_len": seq_len, "seed": 1}},
        "targets": {"k2": {"remove_blocks": 2}},
        "methods": {"flattengpt": {"method": "flattengpt"}, "drop": {"method": "drop"}},
        "compute": {"device": "cpu", "threads": 1},
        "evaluation": {
            "perplexity": {"seq_len": 64, "max_windows": 4,
                           "corpora": {"tragedies": {"source": "embedded", "name": "shakespeare-eval"}}},
            "speed": {"prompt_len": 16, "decode_tokens": 4, "warmup": 1, "repeats": 2},
            "generation": {"prompts": ["Once upon a time"], "max_new_tokens": 8},
        },
    }


def assert_outputs(workdir, num_layers, n_samples, seq_len):
    root = workdir / "results" / "tiny" / "plays"
    model = json.loads((workdir / "results" / "tiny" / "model.json").read_text())
    assert model["num_hidden_layers"] == num_layers
    manifest = json.loads((root / "activations" / "manifest.json").read_text())
    assert manifest["files"] == [f"layer_{i:03d}.safetensors" for i in range(num_layers + 1)]
    hidden, positions = load_layer(root / "activations", num_layers)
    assert hidden.shape == (n_samples, seq_len, model["hidden_size"])
    for name in SIMILARITY:
        assert (root / "similarity" / f"{name}.png").stat().st_size > 1000
    cosine, labels = load_matrix(root / "similarity" / "cosine.csv")
    assert cosine.shape == (num_layers + 1, num_layers + 1) and len(labels) == num_layers + 1
    plan = json.loads((root / "k2" / "flattengpt" / "plan.json").read_text())
    assert plan["remove_blocks"] == 2 and sum(len(g) for g in plan["groups"]) == num_layers
    assert len(plan["groups"]) == num_layers - 2 and plan["format"] == 2 and plan["method"] == "flattengpt"
    assert plan["provenance"]["package"]["source_sha256"]
    drop = json.loads((root / "k2" / "drop" / "plan.json").read_text())
    assert drop["kept_blocks"] == plan["kept_blocks"] and drop["dropped_blocks"] == plan["removed_blocks"]
    for log in ("calibration", "activations", "similarity"):
        assert (root / "logs" / f"{log}.log").stat().st_size > 0
    model_dirs = sorted((root / "k2").glob("*/model"))
    assert model_dirs
    for model_dir in model_dirs:
        assert_loadable(model_dir, num_layers - 2)
    return plan


def assert_loadable(model_dir, num_layers):
    """A compressed model is an ordinary checkpoint: vanilla from_pretrained, the right depth, finite logits."""
    from transformers import AutoModelForCausalLM

    record = json.loads((model_dir / "compression.json").read_text())
    assert record["num_layers"]["compressed"] == num_layers
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == num_layers
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def stories_config(**kwargs):
    """STORIES with two local zero-shot tasks (a few items each) on top of the base config."""
    config = base_config(STORIES, **kwargs)
    config["evaluation"]["zero_shot"] = {"tasks": ["arc_easy", "winogrande"], "limit": 4, "batch_size": 8,
                                         "data_dir": str(SHARED / "tasks" / "lm_eval_jsonl")}
    return config


def assert_report(workdir, n_rows, tasks, corpora):
    import pandas as pd

    report = workdir / "results" / "report"
    table = pd.read_csv(report / "results.csv")
    assert len(table) == n_rows, "one row per evaluated model"
    expected = ["model", "calibration", "method", "recovered_from", "method_type", "target", "blocks_removed",
                "num_layers",
                "parameters", "param_ratio", *[f"ppl_{c}" for c in corpora],
                *[c for t in tasks for c in (t, f"{t}_stderr")],
                "mean_acc", "n_tasks", "retention", "prefill_speedup", "decode_speedup", "ideal_speedup",
                "prefill_tokens_per_s", "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_memory_mib",
                "choice_seconds", "choice_block_forwards", "compression_seconds", "compression_peak_rss_mib",
                "recovery_steps", "recovery_seconds", "size_on_disk_mb"]
    assert list(table.columns) == expected
    dense = table[table.method == "dense"].iloc[0]
    assert dense.blocks_removed == 0 and dense.param_ratio == 1.0 and dense.ideal_speedup == 1.0
    compressed = table[table.method != "dense"]
    assert (compressed.blocks_removed > 0).all() and (compressed.param_ratio < 1).all()
    assert (compressed.prefill_speedup > 0).all() and (compressed.decode_speedup > 0).all()
    assert (table[[f"ppl_{c}" for c in corpora]] > 1).all().all()
    for figure in ["results.md", "generations.md", *[f"perplexity_{c}.png" for c in corpora]]:
        assert (report / figure).stat().st_size > 100, figure
    assert list((report / "plans").glob("*.png"))
    return table


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_workflow_on_stories260k_and_incremental_reruns(tmp_path):
    write_config(tmp_path, stories_config())
    snakemake(tmp_path)
    assert_outputs(tmp_path, num_layers=5, n_samples=6, seq_len=32)
    table = assert_report(tmp_path, 3, ["winogrande", "arc_easy"], ["tragedies"])
    assert table.n_tasks.tolist() == [2, 2, 2]
    record = json.loads((tmp_path / "results" / "tiny" / "dense" / "eval" / "zero_shot" / "arc_easy.json").read_text())
    assert record["metric"] == "acc_norm" and record["n_samples"]["effective"] == 4
    assert record["lm_eval_version"] == "0.4.13" and record["source"] == "local"

    # as a user types it, without --cores
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--report", "report.html"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "results.csv" in html

    assert planned_jobs(tmp_path) == {}, "a second invocation has nothing to do"

    evaluations = {"perplexity": 1, "zero_shot": 2, "generate": 1, "speed": 1}  # per compressed model
    config = stories_config()
    config["targets"]["k2"]["remove_blocks"] = 1
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"plan": 2, "compress": 2, **{k: 2 * v for k, v in evaluations.items()},
                                      "report": 1, "all": 1}, \
        "a changed target reruns only the plans, the compressions that use them and their evaluations"

    config = stories_config()
    config["methods"]["flattengpt"]["lambda_factor"] = 1.0
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"compress": 1, **evaluations, "report": 1, "all": 1}, \
        "a changed lambda reruns only FlattenGPT and its evaluations, not drop"

    config = stories_config()
    config["evaluation"]["zero_shot"]["limit"] = 3
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"zero_shot": 6, "report": 1, "all": 1}, "a changed limit reruns only zero-shot"
    config["evaluation"]["zero_shot"]["limit"] = {"arc_easy": 4, "winogrande": 3}
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"zero_shot": 3, "report": 1, "all": 1}, "a per-task limit reruns only that task"

    config = stories_config(n_samples=5)
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"calibration": 1, "activations": 1, "similarity": 1, "plan": 2, "compress": 2,
                                      **{k: 2 * v for k, v in evaluations.items()}, "report": 1, "all": 1}, \
        "new calibration data re-evaluates the compressed models, never the dense one"
    # (executing these plans is what the kill-and-resume tests do; here the plans themselves are the subject)


def test_workflow_on_random_qwen2(tmp_path):
    model = make_model_with_tokenizer(tmp_path / "model", "qwen2", num_hidden_layers=6)
    config = base_config(model)
    config["targets"]["k2"]["max_group_size"] = 2
    config["targets"]["ratio"] = {"ratio": 0.3}
    config["methods"]["flattengpt-original"] = {"method": "flattengpt", "compensation_target": "original",
                                                "lambda_factor": "auto", "attn_compensation": True}
    # the Qwen2 adapter's checkpoints are loaded and run by assert_outputs; perplexity and speed of every
    # stage are the llama runs' (17 more evaluation jobs cost CI minutes here)
    config["evaluation"] = {"dense": False, "perplexity": {"corpora": {}}, "speed": {"enabled": False},
                            "generation": {"prompts": ["Once upon a time"], "max_new_tokens": 2}}
    write_config(tmp_path, config)
    snakemake(tmp_path)
    plan = assert_outputs(tmp_path, num_layers=6, n_samples=6, seq_len=32)
    assert max(len(g) for g in plan["groups"]) <= 2
    ratio_plan = json.loads((tmp_path / "results" / "tiny" / "plays" / "ratio" / "flattengpt" / "plan.json").read_text())
    assert ratio_plan["remove_blocks"] >= 1 and 0 < ratio_plan["ratio_achieved"] < 1
    assert_lambda_picks(tmp_path, "flattengpt-original", {"MLP", "o_proj"})


def assert_lambda_picks(workdir, method, fits):
    """lambda_factor auto: every flattened group's picks in compression.json, the report's CSV and figure."""
    import pandas as pd

    report = workdir / "results" / "report"
    picks = pd.read_csv(report / "lambda_picks.csv")
    picks = picks[picks.method == method]
    assert set(picks.fit) == fits
    assert (report / "lambda_picks.png").stat().st_size > 1000
    for model_dir in (workdir / "results" / "tiny" / "plays").glob(f"*/{method}/model"):
        record = json.loads((model_dir / "compression.json").read_text())
        validated = [s for s in record["group_stats"] if "lambda_validation" in s]
        assert validated and len(picks[picks.target == model_dir.parent.parent.name]) == len(validated) * len(fits)
        for stats in validated:
            for curve in (v for k, v in stats["lambda_validation"].items() if k in ("mlp", "attention", "map")):
                assert curve["pick"] in curve["grid"] and len(curve["held_out_error"]) == len(curve["grid"])


def test_every_baseline_runs_through_the_plan_and_search_rules(tmp_path):
    """ShortGPT, Gromov, ReplaceMe (plan rule) and SLEB, SLM, LaCo (search rule) on the same activations.

    Evaluation is cut to the sample generations (no perplexity corpus, no speed): this checks the
    wiring of every method through real Snakemake jobs, the methods' math is tested in their own files.
    """
    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=6)
    config = base_config(model)
    # one method per path through the rules: plan rule without fit (shortgpt), with fit (replaceme), search
    # rule dropping (sleb) and merging (laco); the others share these paths
    config["methods"] = {name: {"method": name} for name in ("shortgpt", "sleb", "replaceme")}
    config["methods"]["replaceme"]["lambda_factor"] = "auto"
    # FlattenGPT choosing its pairs by trial compressions: the search rule, then compress
    config["methods"]["flattengpt-trial"] = {"method": "flattengpt", "plan_criterion": "trial_error",
                                             "lambda_factor": "auto"}
    config["methods"]["laco-code"] = {"method": "laco", "rule": "code", "merge_layers": 2, "interval": 1}
    config["evaluation"] = {"dense": False, "perplexity": {"corpora": {}}, "speed": {"enabled": False},
                            "generation": {"prompts": ["Once upon a time"], "max_new_tokens": 2}}
    write_config(tmp_path, config)
    snakemake(tmp_path)
    root = tmp_path / "results" / "tiny" / "plays" / "k2"
    ops = {"sleb": {"keep"}, "shortgpt": {"keep"}, "laco-code": {"keep", "merge"}, "replaceme": {"keep", "patch"},
           "flattengpt-trial": {"keep", "flatten"}}
    for name, allowed in ops.items():
        plan = json.loads((root / name / "plan.json").read_text())
        assert plan["remove_blocks"] == 2 and plan["format"] == 2, name
        assert {layer["op"] for layer in plan["layers"]} <= allowed, name
        record = json.loads((root / name / "model" / "compression.json").read_text())
        assert record["layers"] == plan["layers"]
        assert record["calibration"]["used"] == (name in ("replaceme", "flattengpt-trial"))
        assert_loadable(root / name / "model", 4)
    for name in ("sleb", "laco-code", "flattengpt-trial"):
        plan = json.loads((root / name / "plan.json").read_text())
        assert plan["cost"]["block_forwards"] > 0 and (root / "logs" / f"search.{name}.log").stat().st_size > 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "results" / "report" / "results.csv")
    assert sorted(table.method) == sorted(ops)
    assert (table.set_index("method").loc[["sleb", "laco-code"], "choice_block_forwards"] > 0).all()
    assert list((tmp_path / "results" / "report" / "plans").glob("*.png"))
    assert_lambda_picks(tmp_path, "replaceme", {"map"})
    assert_lambda_picks(tmp_path, "flattengpt-trial", {"MLP"})


def test_recovery_of_a_compressed_and_the_dense_model_reported_against_their_sources(tmp_path):
    """A recovery: setting with dense: true, one method and one target: both tuned, evaluated, paired in the report."""
    import pandas as pd

    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=4)
    config = base_config(model)
    config["methods"] = {"drop": {"method": "drop"}}
    config["targets"]["k1"] = {"remove_blocks": 1}
    config["recovery"] = {"heal": {"data": {"source": "embedded", "name": "shakespeare-calibration"}, "dense": True,
                                   "targets": ["k2"], "max_steps": 2, "batch_size": 4, "micro_batch_size": 2,
                                   "cutoff_len": 32, "learning_rate": 0.01, "val_fraction": 0.0, "log_every": 1}}
    write_config(tmp_path, config)
    jobs = planned_jobs(tmp_path)  # drop+heal is not timed: it has drop's shapes, the report shows drop's speed
    assert (jobs["recover"], jobs["recover_dense"], jobs["perplexity"], jobs["speed"]) == (1, 1, 5, 2)
    config["evaluation"]["speed"]["enabled"] = False  # timed in the stories run
    del config["targets"]["k1"]  # `targets: [k2]` leaving k1 alone is the plan above; k1's 4 jobs cost CI time
    write_config(tmp_path, config)
    snakemake(tmp_path)
    results = tmp_path / "results" / "tiny"
    dense = results / "dense+heal" / "model"
    recovery = json.loads((dense / "recovery.json").read_text())
    assert recovery["steps"]["total"] == 2 and recovery["provenance"]["rule"] == "recover_dense"
    assert recovery["model"]["path"] == str(model) and not (dense / "compression.json").exists()
    assert (results / "logs" / "recover.dense+heal.log").stat().st_size > 0
    assert not (results / ".resume" / "recover.dense+heal").exists(), "the resume state goes with success"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(dense).config.num_hidden_layers == 4
    perplexity = json.loads((results / "dense+heal" / "eval" / "perplexity" / "tragedies.json").read_text())
    assert perplexity["provenance"]["inputs"]["model"] == "recovered dense"
    recovered = results / "plays" / "k2" / "drop+heal" / "model"
    assert_loadable(recovered, 2)
    recovery = json.loads((recovered / "recovery.json").read_text())
    assert recovery["steps"]["total"] == 2 and recovery["provenance"]["rule"] == "recover"
    assert (recovered / "adapter").is_dir() and (recovered / "curve.csv").is_file()
    assert not (results / "plays" / "k2" / ".resume" / "recover.drop+heal").exists()

    report = tmp_path / "results" / "report"
    table = pd.read_csv(report / "results.csv")
    assert table.method.tolist() == ["dense", "dense+heal", "drop", "drop+heal"]
    assert table.recovered_from.fillna("-").tolist() == ["-", "dense", "-", "drop"]
    assert table.blocks_removed.tolist() == [0, 0, 2, 2]
    deltas = pd.read_csv(report / "recovery.csv")
    ppl = deltas[deltas.metric == "ppl_tragedies"].set_index("recovered")
    for recovered, (source, blocks) in {"dense+heal": ("dense", 0), "drop+heal": ("drop", 2)}.items():
        source_row = table[(table.method == source) & (table.blocks_removed == blocks)].iloc[0]
        row = table[table.method == recovered].iloc[0]
        assert ppl.loc[recovered, "source_value"] == pytest.approx(source_row.ppl_tragedies)
        assert ppl.loc[recovered, "delta"] == pytest.approx(row.ppl_tragedies - source_row.ppl_tragedies)
        assert ppl.loc[recovered, "delta"] != 0, "two steps at lr 0.01 move the perplexity"
    assert "## tiny: dense+heal" in (report / "recovery.md").read_text()


def test_runs_restrict_the_methods_of_a_combination(tmp_path):
    """`runs:` with `methods`: only the listed methods of that combination are planned (dry run)."""
    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=4)
    config = base_config(model)
    config["calibration"]["other"] = dict(config["calibration"]["plays"], seed=2)
    config["evaluation"]["speed"]["enabled"] = False
    config["runs"] = [{"model": "tiny", "calibration": "plays", "target": "k2"},
                      {"model": "tiny", "calibration": "other", "target": "k2", "methods": ["drop"]}]
    write_config(tmp_path, config)
    jobs = planned_jobs(tmp_path)
    assert jobs["compress"] == 3 and jobs["plan"] == 3, jobs   # flattengpt and drop on plays, drop on other
    out = snakemake(tmp_path, "-n").stdout
    assert "results/tiny/other/k2/drop/model" in out and "results/tiny/other/k2/flattengpt" not in out


def test_bad_config_fails_before_any_job(tmp_path):
    write_config(tmp_path, {
        "models": {"m": {"source": "local", "path": str(tmp_path / "missing")}},
        "calibration": {"c": {"source": "local", "path": str(tmp_path / "nope.txt")}},
        "targets": {"t": {"remove_blocks": 3}, "r": {"ratio": 1.2}},
    })
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "targets.r.ratio: 1.2 is greater than or equal to the maximum of 1" in text
    write_config(tmp_path, {
        "models": {"m": {"source": "local", "path": str(tmp_path / "missing")}},
        "calibration": {"c": {"source": "local", "path": str(tmp_path / "nope.txt")}},
        "targets": {"t": {"remove_blocks": 3}},
    })
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "models.m.path" in text and "calibration.c.path" in text
    assert not (tmp_path / "results").exists()


def test_lint_is_clean(tmp_path):
    write_config(tmp_path, base_config(make_model_with_tokenizer(tmp_path / "model", "llama")))
    result = snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_killed_activations_stage_resumes_where_it_stopped(tmp_path):
    """SIGKILL the whole run while the activations job is mid-model, then rerun the same command."""
    import os
    import signal
    import time

    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=16, hidden_size=256,
                                      intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=32)
    config = base_config(model, n_samples=16, seq_len=256)
    config["activations"] = {"checkpoint_every": 1}
    config["evaluation"]["speed"]["enabled"] = False
    write_config(tmp_path, config)
    state = tmp_path / "results" / "tiny" / "plays" / ".resume" / "activations" / "state.json"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "1", "--scheduler", "greedy"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=AIR_GAPPED)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            killed_at = json.loads(state.read_text())["next_layer"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            killed_at = None
        if killed_at and killed_at >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at and killed_at >= 2, "the run ended before it could be killed mid-stage"
    acts = tmp_path / "results" / "tiny" / "plays" / "activations"
    assert not acts.exists(), "a killed stage leaves no output that looks complete"

    snakemake(tmp_path, "--unlock")
    snakemake(tmp_path, "results/tiny/plays/activations")  # the stages after it are not this test's subject
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["resumed_from_layer"] >= killed_at
    log = (tmp_path / "results" / "tiny" / "plays" / "logs" / "activations.log").read_text()
    assert f"resuming from X_{manifest['resumed_from_layer']}" in log

    # identical to an uninterrupted computation on the same tokens
    from flattengpt.activations import compute_activations
    from flattengpt.data import load_tokens

    ids, _ = load_tokens(tmp_path / "results" / "tiny" / "plays" / "tokens.safetensors")
    compute_activations(model, ids, tmp_path / "fresh", state_dir=tmp_path / "fresh-state")
    for index in range(17):
        assert torch.equal(load_layer(acts, index)[0], load_layer(tmp_path / "fresh", index)[0]), index
