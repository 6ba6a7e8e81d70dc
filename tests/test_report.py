"""The report against a small, self-consistent set of stage outputs, checked by hand."""

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from flattengpt import report
from flattengpt.provenance import read_json, write_json

MODEL = "tiny-12"
LAYERS = 12
DENSE_PARAMS = 1000
CORPORA = {"wikitext2": 20.0, "c4": 30.0}
TASKS = [*report.PAPER_TASKS, "boolq"]
DENSE_ACC = {"piqa": 0.70, "winogrande": 0.60, "hellaswag": 0.50, "arc_easy": 0.65, "arc_challenge": 0.35,
             "boolq": 0.62}
DENSE_SPEED = {"prefill_tokens_per_s": 1000.0, "decode_ms_per_token": 10.0, "kv_cache_bytes_per_token": 4096,
               "peak_memory_mib": 50.0, "num_layers": LAYERS, "parameters": DENSE_PARAMS}
# compressed checkpoints: tensors of known shape, so parameters and size on disk are exact
SHAPES = {3: {"embed": (25, 20), "blocks": (5, 50)},   # 500 + 250 = 750 parameters
          6: {"embed": (25, 20)}}                       # 500 parameters
NUMEL = {3: 750, 6: 500}

EXPECTED_COLUMNS = [
    "model", "calibration", "method", "recovered_from", "method_type", "target", "blocks_removed", "num_layers",
    "parameters", "param_ratio",
    "ppl_c4", "ppl_wikitext2",
    "piqa", "piqa_stderr", "winogrande", "winogrande_stderr", "hellaswag", "hellaswag_stderr",
    "arc_easy", "arc_easy_stderr", "arc_challenge", "arc_challenge_stderr", "boolq", "boolq_stderr",
    "mean_acc", "n_tasks", "retention", "prefill_speedup", "decode_speedup", "ideal_speedup",
    "prefill_tokens_per_s", "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_memory_mib",
    "choice_seconds", "choice_block_forwards", "compression_seconds", "compression_peak_rss_mib", "recovery_steps",
    "recovery_seconds", "size_on_disk_mb",
]


def accuracy(k: int, seed: int) -> dict[str, float]:
    """Each removed block costs 1 point (0.01) on every task, the second seed another 0.5 point."""
    return {task: value - 0.01 * k - 0.005 * seed for task, value in DENSE_ACC.items()}


def evaluations(base, ppl_scale: float, acc: dict | None, missing_task: str | None = None):
    perplexity, zero_shot = {}, {}
    for corpus, value in CORPORA.items():
        perplexity[corpus] = base / "ppl" / f"{corpus}.json"
        write_json(perplexity[corpus], {"corpus": corpus, "perplexity": value * ppl_scale,
                                        "mean_nll": math.log(value * ppl_scale), "n_windows": 4, "seq_len": 128,
                                        "n_predicted_tokens": 508})
    for task in TASKS:
        zero_shot[task] = base / "zs" / f"{task}.json"
        if acc is not None and task != missing_task:
            write_json(zero_shot[task], {"task": task, "metric": "acc" if task == "winogrande" else "acc_norm",
                                         "value": acc[task], "stderr": 0.01, "limit": None,
                                         "n_samples": {"original": 100, "effective": 100},
                                         "lm_eval_version": "0.4.13", "source": "local"})
    return perplexity, zero_shot


def generations(base, tag: str):
    path = base / "generations.json"
    write_json(path, {"max_new_tokens": 8, "outputs": [
        {"prompt": "The capital of France is", "completion": f" Paris ({tag})", "n_new_tokens": 3},
        {"prompt": "Once upon a time", "completion": f" there was\na {tag}", "n_new_tokens": 4}]})
    return path


@pytest.fixture
def entries(tmp_path):
    dense_dir = tmp_path / "hub" / MODEL
    dense_dir.mkdir(parents=True)
    save_file({"w": torch.zeros(10, 100)}, str(dense_dir / "model.safetensors"))
    model_json = tmp_path / MODEL / "model.json"
    write_json(model_json, {"path": str(dense_dir), "note": None, "block_shape": {"hidden_size": 20},
                            "parameters": {"total": DENSE_PARAMS, "per_block": [60] * LAYERS, "embeddings": 280}})
    dense_base = tmp_path / MODEL / "dense"
    ppl, zs = evaluations(dense_base / "eval", 1.0, DENSE_ACC)
    result = [{"model": MODEL, "calibration": None, "target": None, "method": "dense", "model_json": str(model_json),
               "compression_json": None, "plan_json": None, "model_dir": None, "perplexity": ppl, "zero_shot": zs,
               "speed": None, "generations": generations(dense_base, "dense")}]

    for seed in (0, 1):
        calibration = f"wiki-seed{seed}"
        for k in (3, 6):
            target = f"remove-{k}"
            plan_json = tmp_path / MODEL / calibration / target / "plan.json"
            groups = [[b] for b in range(LAYERS - k - 1)] + [list(range(LAYERS - k - 1, LAYERS))]
            write_json(plan_json, {"groups": groups, "remove_blocks": k, "num_layers": LAYERS,
                                   "params_before": DENSE_PARAMS, "params_after": DENSE_PARAMS - 60 * k,
                                   "ratio_achieved": (DENSE_PARAMS - 60 * k) / DENSE_PARAMS})
            for method in ("flattengpt", "drop") if (seed, k) == (0, 3) else ("flattengpt",):
                base = tmp_path / MODEL / calibration / target / method
                model_dir = base / "model"
                compression_json = model_dir / "compression.json"
                write_json(compression_json, {"method": method, "groups": groups,
                                              "num_layers": {"original": LAYERS, "compressed": LAYERS - k},
                                              "timings": {"seconds": 10.0 * k + seed}, "peak_rss_mib": 100.0 + k,
                                              "peak_cuda_mib": None})
                entry = {"model": MODEL, "calibration": calibration, "target": target, "method": method,
                         "model_json": str(model_json), "compression_json": str(compression_json),
                         "plan_json": str(plan_json), "model_dir": str(model_dir)}
                if method == "drop":
                    # no checkpoint weights, no zero-shot files, no speed run: those columns become NaN
                    ppl, zs = evaluations(base / "eval", 2.0 + k, None)
                    entry.update(perplexity=ppl, zero_shot=zs, speed=None, generations=None)
                else:
                    save_file({name: torch.ones(shape) for name, shape in SHAPES[k].items()},
                              str(model_dir / "model.safetensors"))
                    missing = "hellaswag" if (seed, k) == (1, 6) else None
                    ppl, zs = evaluations(base / "eval", 1.0 + 0.1 * k + 0.01 * seed, accuracy(k, seed), missing)
                    speed = base / "eval" / "speed.json"
                    compressed = {"prefill_tokens_per_s": 1000.0 * LAYERS / (LAYERS - k),
                                  "decode_ms_per_token": 10.0 * (LAYERS - k) / LAYERS,
                                  "kv_cache_bytes_per_token": 4096 * (LAYERS - k) // LAYERS,
                                  "peak_memory_mib": 50.0 - k, "num_layers": LAYERS - k,
                                  "parameters": NUMEL[k]}
                    write_json(speed, {"settings": {"device": "cpu"},
                                       "models": {"dense": DENSE_SPEED, "compressed": compressed},
                                       "ratios": {"compressed": {"prefill_speedup": 1.1 + 0.01 * k,
                                                                 "decode_speedup": 1.2 + 0.01 * k,
                                                                 "ideal_speedup": LAYERS / (LAYERS - k)}}})
                    entry.update(perplexity=ppl, zero_shot=zs, speed=str(speed),
                                 generations=generations(base, f"{method}-{k}-{seed}"))
                result.append(entry)
    return result


def row(table, method, calibration=None, blocks=0):
    if method == "dense":
        selected = table[table["method"] == "dense"]
    else:
        selected = table[(table["method"] == method) & (table["calibration"] == calibration)
                         & (table["blocks_removed"] == blocks)]
    assert len(selected) == 1
    return selected.iloc[0]


def test_table_shape_order_and_columns(entries):
    table = report.results_table(entries)
    assert len(table) == len(entries) == 6
    assert list(table.columns) == EXPECTED_COLUMNS
    order = list(zip(table["method"], table["calibration"].fillna("-"), table["blocks_removed"]))
    assert order == [("dense", "-", 0), ("drop", "wiki-seed0", 3), ("flattengpt", "wiki-seed0", 3),
                     ("flattengpt", "wiki-seed0", 6), ("flattengpt", "wiki-seed1", 3),
                     ("flattengpt", "wiki-seed1", 6)]
    assert table["target"].tolist()[1:] == ["remove-3", "remove-3", "remove-6", "remove-3", "remove-6"]


def test_table_values_by_hand(entries):
    table = report.results_table(entries)
    dense = row(table, "dense")
    assert dense["blocks_removed"] == 0 and dense["num_layers"] == LAYERS and dense["parameters"] == DENSE_PARAMS
    assert dense["param_ratio"] == 1.0
    dense_mean = 100 * sum(DENSE_ACC.values()) / len(DENSE_ACC)
    assert dense["mean_acc"] == pytest.approx(dense_mean) and dense["n_tasks"] == 6
    assert dense["retention"] == pytest.approx(1.0)
    assert [dense[c] for c in ("prefill_speedup", "decode_speedup", "ideal_speedup")] == [1.0, 1.0, 1.0]
    # the dense model's inference figures come from the speed runs beside the compressed models
    for name in ("prefill_tokens_per_s", "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_memory_mib"):
        assert dense[name] == DENSE_SPEED[name]
    assert math.isnan(dense["compression_seconds"]) and math.isnan(dense["compression_peak_rss_mib"])
    # the dense entry has no model_dir: its size is that of model.json's path, 1000 float32 plus a header
    dense_bytes = os.path.getsize(Path(read_json(entries[0]["model_json"])["path"]) / "model.safetensors")
    assert dense_bytes > 1000 * 4 and dense["size_on_disk_mb"] == pytest.approx(dense_bytes / 1e6)
    assert dense["ppl_wikitext2"] == 20.0 and dense["ppl_c4"] == 30.0
    assert dense["piqa"] == pytest.approx(70.0) and dense["piqa_stderr"] == pytest.approx(1.0)

    for seed in (0, 1):
        for k in (3, 6):
            r = row(table, "flattengpt", f"wiki-seed{seed}", k)
            entry = next(e for e in entries if e["method"] == "flattengpt" and e["calibration"] == f"wiki-seed{seed}"
                         and e["target"] == f"remove-{k}")
            assert r["num_layers"] == LAYERS - k
            assert r["parameters"] == NUMEL[k]  # from the safetensors headers, not the plan's 1000 - 60 k
            assert r["param_ratio"] == pytest.approx(NUMEL[k] / DENSE_PARAMS)
            size = os.path.getsize(Path(entry["model_dir"]) / "model.safetensors")
            assert r["size_on_disk_mb"] == pytest.approx(size / 1e6)
            assert size > NUMEL[k] * 4
            acc = accuracy(k, seed)
            tasks = [t for t in TASKS if not (seed == 1 and k == 6 and t == "hellaswag")]
            mean = sum(100 * acc[t] for t in tasks) / len(tasks)
            dense_on_same = sum(100 * DENSE_ACC[t] for t in tasks) / len(tasks)
            assert r["n_tasks"] == len(tasks)
            assert r["mean_acc"] == pytest.approx(mean)
            assert r["retention"] == pytest.approx(mean / dense_on_same)
            assert r["ppl_wikitext2"] == pytest.approx(20.0 * (1.0 + 0.1 * k + 0.01 * seed))
            assert r["ideal_speedup"] == pytest.approx(LAYERS / (LAYERS - k))
            assert r["prefill_speedup"] == pytest.approx(1.1 + 0.01 * k)
            assert r["decode_ms_per_token"] == pytest.approx(10.0 * (LAYERS - k) / LAYERS)
            assert r["compression_seconds"] == 10.0 * k + seed and r["compression_peak_rss_mib"] == 100.0 + k
    # the missing zero-shot file is NaN, not an error
    assert math.isnan(row(table, "flattengpt", "wiki-seed1", 6)["hellaswag"])
    # retention with identical task sets is mean_acc / dense mean_acc
    r = row(table, "flattengpt", "wiki-seed0", 3)
    assert r["retention"] == pytest.approx(r["mean_acc"] / dense_mean)


def test_missing_inputs_are_nan(entries):
    table = report.results_table(entries)
    drop = row(table, "drop", "wiki-seed0", 3)
    assert drop["blocks_removed"] == 3 and drop["num_layers"] == LAYERS - 3
    assert drop["parameters"] == DENSE_PARAMS - 180  # no weights on disk: the plan's params_after
    assert drop["param_ratio"] == pytest.approx(0.82)
    assert drop["ppl_c4"] == pytest.approx(150.0)
    assert drop["n_tasks"] == 0
    for name in ["mean_acc", "retention", "size_on_disk_mb", "prefill_speedup", "decode_speedup",
                 "ideal_speedup", "prefill_tokens_per_s", "peak_memory_mib"] + TASKS + [f"{t}_stderr" for t in TASKS]:
        assert math.isnan(drop[name]), name
    # without a dense entry: no retention, but param_ratio still comes from model.json
    table = report.results_table(entries[1:])
    assert table["retention"].isna().all()
    assert row(table, "flattengpt", "wiki-seed0", 6)["param_ratio"] == pytest.approx(0.5)
    # an entry pointing only at files that do not exist
    empty = report.results_table([{"model": "ghost", "calibration": None, "target": None, "method": "dense",
                                   "model_json": "/nonexistent/model.json", "perplexity": {"wikitext2": "/nope"},
                                   "zero_shot": {}, "speed": None}])
    assert len(empty) == 1 and pd.isna(empty.loc[0, "parameters"]) and math.isnan(empty.loc[0, "ppl_wikitext2"])


def test_write_table_csv_and_markdown(entries, tmp_path):
    table = report.results_table(entries)
    csv, md = tmp_path / "report" / "results.csv", tmp_path / "report" / "results.md"
    report.write_table(table, csv, md, title="Results", notes=["ppl: lower is better", "accuracy in percent"])
    back = pd.read_csv(csv)
    assert back.shape == table.shape and list(back.columns) == EXPECTED_COLUMNS
    np.testing.assert_allclose(back["mean_acc"], table["mean_acc"].astype(float), equal_nan=True, rtol=0, atol=0)
    lines = md.read_text().splitlines()
    assert lines[0] == "# Results"
    table_lines = [line for line in lines if line.startswith("|")]
    assert table_lines[0] == "| " + " | ".join(EXPECTED_COLUMNS) + " |"
    assert len(table_lines) == 2 + len(table)  # header, separator, one per row
    assert all(line.count("|") == len(EXPECTED_COLUMNS) + 1 for line in table_lines)
    dense_line = table_lines[2]
    assert "| 1,000 |" in dense_line and "| 20.00 |" in dense_line and "| 70.0 |" in dense_line
    assert "| 1.000 |" in dense_line and "–" in dense_line
    assert "- ppl: lower is better" in lines and "- accuracy in percent" in lines
    assert not list((tmp_path / "report").glob(".*.tmp"))


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots(entries, tmp_path):
    table = report.results_table(entries)
    for column, log_y in (("ppl_wikitext2", True), ("mean_acc", False), ("prefill_speedup", False)):
        path = tmp_path / "plots" / f"{column}.png"
        report.plot_vs_blocks(table, column, path, ylabel=column, title=column, log_y=log_y)
        assert is_png(path)
    # a column with no values at all still yields a figure (Snakemake expects the file)
    path = tmp_path / "plots" / "empty.png"
    report.plot_vs_blocks(table.assign(mean_acc=np.nan), "mean_acc", path, ylabel="x", title="x")
    assert is_png(path)


def test_plot_plan(tmp_path):
    labels = [f"X{i}" for i in range(LAYERS + 1)]
    index = np.arange(LAYERS + 1)
    matrix = 1.0 - np.abs(index[:, None] - index[None, :]) / (LAYERS + 1)
    cosine = tmp_path / "cosine.csv"
    pd.DataFrame(matrix, index=labels, columns=labels).to_csv(cosine)
    from flattengpt.plan import Layer, Plan

    flattening = Plan.from_groups(LAYERS, [[0], [1, 2, 3], [4], [5], [6, 7], *[[b] for b in range(8, LAYERS)]])
    shortgpt = Plan.from_kept(LAYERS, [b for b in range(LAYERS) if b not in (2, 5, 9)])
    merged = Plan(LAYERS, [*[Layer("keep", [b]) for b in range(8)], Layer("merge", [8, 9, 10], {8: -1, 9: 1, 10: 1}),
                           Layer("keep", [11])])
    plans = {}
    for name, plan in (("flattengpt", flattening), ("shortgpt", shortgpt), ("laco", merged)):
        plans[name] = tmp_path / f"{name}.json"
        write_json(plans[name], plan.validate().to_json())
    one, three = tmp_path / "plans" / "one.png", tmp_path / "plans" / "three.png"
    report.plot_plan(cosine, {"flattengpt": plans["flattengpt"]}, one, title="tiny-12 / wiki-seed0 / remove-3")
    report.plot_plan(cosine, plans, three, title="tiny-12 / wiki-seed0 / remove-3")
    assert is_png(one) and is_png(three)
    from PIL import Image

    # one strip per method under the heatmap
    assert Image.open(three).size[1] > Image.open(one).size[1]


def test_generations_markdown(entries):
    labelled = [(report.variant_label(e), read_json(e["generations"])) for e in entries if e["generations"]]
    assert labelled[0][0] == "dense" and labelled[1][0] == "flattengpt / remove-3 / wiki-seed0"
    text = report.generations_markdown(labelled)
    assert text.count("## Prompt") == 2
    assert "> The capital of France is" in text
    for label, _ in labelled:
        assert text.count(f"**{label}**") == 2
    assert ">  Paris (dense)" in text  # the completion as generated, its leading space kept
    assert ">  there was\n> a dense" in text  # multi-line completions stay inside the quote


# ----------------------------------------------------------------------------- recovered models

# (calibration, blocks removed) of the recovered FlattenGPT models and how they change: perplexity scale,
# accuracy shift per task (fraction), prefill speedup shift; (None, 0) is the dense model
RECOVERED = {("wiki-seed0", 3): (1.15, 0.02, 0.005), ("wiki-seed0", 6): (1.3, 0.04, -0.01),
             ("wiki-seed1", 3): (1.2, 0.01, 0.0), (None, 0): (0.95, 0.01, None)}


def recovered_entry(tmp_path, source: dict, ppl_scale, acc_shift, speed_shift, steps=25) -> dict:
    """A `{source}+heal` entry beside `source`: the same architecture, its own evaluations."""
    dense = source["method"] == "dense"
    method = f"{source['method']}+heal"
    base = tmp_path / MODEL / "dense+heal" if dense else \
        tmp_path / MODEL / source["calibration"] / source["target"] / method
    model_dir = base / "model"
    k = 0 if dense else int(source["target"].split("-")[1])
    shapes = {"w": (10, 100)} if dense else SHAPES[k]
    model_dir.mkdir(parents=True)
    save_file({name: torch.ones(shape) for name, shape in shapes.items()}, str(model_dir / "model.safetensors"))
    write_json(model_dir / "recovery.json", {"steps": {"total": steps}, "timings": {"seconds": 60.0 + k}})
    source_acc = DENSE_ACC if dense else accuracy(k, int(source["calibration"][-1]))
    ppl, zs = evaluations(base / "eval", (1.0 if dense else 1.0 + 0.1 * k + 0.01 * int(source["calibration"][-1]))
                          * ppl_scale, {t: v + acc_shift for t, v in source_acc.items()})
    entry = {**source, "method": method, "recovered_from": source["method"], "recovery": "heal",
             "model_dir": str(model_dir), "recovery_json": str(model_dir / "recovery.json"), "perplexity": ppl,
             "zero_shot": zs, "generations": None, "speed": None}
    if not dense:
        import shutil

        shutil.copyfile(source["compression_json"], model_dir / "compression.json")
        entry["compression_json"] = str(model_dir / "compression.json")
        record = read_json(source["speed"])
        record["ratios"]["compressed"]["prefill_speedup"] += speed_shift
        write_json(base / "eval" / "speed.json", record)
        entry["speed"] = str(base / "eval" / "speed.json")
    return entry


@pytest.fixture
def with_recovered(entries, tmp_path):
    added = []
    for (calibration, k), change in RECOVERED.items():
        source = next(e for e in entries if e["method"] == ("dense" if k == 0 else "flattengpt")
                      and e["calibration"] == calibration and (k == 0 or e["target"] == f"remove-{k}"))
        added.append(recovered_entry(tmp_path, source, *change))
    return added + entries  # recovered first: the table puts each after its source


def test_recovered_rows_follow_their_source(with_recovered):
    table = report.results_table(with_recovered)
    order = list(zip(table["method"], table["calibration"].fillna("-"), table["blocks_removed"]))
    assert order == [("dense", "-", 0), ("dense+heal", "-", 0), ("drop", "wiki-seed0", 3),
                     ("flattengpt", "wiki-seed0", 3), ("flattengpt+heal", "wiki-seed0", 3),
                     ("flattengpt", "wiki-seed0", 6), ("flattengpt+heal", "wiki-seed0", 6),
                     ("flattengpt", "wiki-seed1", 3), ("flattengpt+heal", "wiki-seed1", 3),
                     ("flattengpt", "wiki-seed1", 6)]
    assert table["recovered_from"].fillna("-").tolist() == ["-", "dense", "-", "-", "flattengpt", "-", "flattengpt",
                                                            "-", "flattengpt", "-"]
    healed = table[table["method"] == "flattengpt+heal"].iloc[0]
    assert healed["recovery_steps"] == 25 and healed["recovery_seconds"] == 63.0
    assert healed["compression_seconds"] == 30.0  # the source's compression, carried over
    assert healed["method_type"] == "flattengpt"
    dense_heal = table[table["method"] == "dense+heal"].iloc[0]
    assert dense_heal["blocks_removed"] == 0 and dense_heal["num_layers"] == LAYERS
    assert dense_heal["parameters"] == 1000 and dense_heal["method_type"] == "dense"
    assert dense_heal["ideal_speedup"] == 1.0 and math.isnan(dense_heal["prefill_speedup"])
    assert dense_heal["retention"] == pytest.approx((sum(DENSE_ACC.values()) + 0.06) / sum(DENSE_ACC.values()))
    assert pd.isna(table[table["method"] == "dense"].iloc[0]["recovery_steps"])


def test_recovery_deltas_by_hand(with_recovered):
    table = report.results_table(with_recovered)
    deltas = report.recovery_table(table)
    assert list(deltas.columns) == report.RECOVERY_COLUMNS
    assert deltas.groupby("recovered", sort=False).size().to_dict() == {"dense+heal": len(report.compared_columns(table)),
                                                                         "flattengpt+heal": 3 * len(report.compared_columns(table))}
    assert "blocks_removed" not in set(deltas["metric"]) and "piqa_stderr" not in set(deltas["metric"])
    assert {"ppl_wikitext2", "ppl_c4", *TASKS, "mean_acc", "retention", "parameters", "prefill_speedup"} <= set(deltas["metric"])

    def cell(calibration, k, metric):
        selected = deltas[(deltas["metric"] == metric) & (deltas["blocks_removed"] == k)
                          & (deltas["calibration"].isna() if calibration is None else deltas["calibration"] == calibration)]
        assert len(selected) == 1
        return selected.iloc[0]

    # flattengpt, wiki-seed0, remove-3: perplexity 20 * 1.3 = 26 -> 26 * 1.15 = 29.9 on wikitext2
    r = cell("wiki-seed0", 3, "ppl_wikitext2")
    assert r["source"] == "flattengpt" and r["recovery"] == "heal" and r["target"] == "remove-3"
    assert r["source_value"] == pytest.approx(26.0) and r["recovered_value"] == pytest.approx(29.9)
    assert r["delta"] == pytest.approx(3.9) and r["delta_pct"] == pytest.approx(15.0) and r["better"] == "no"
    assert math.isnan(r["delta_stderr"])
    # each task 2 points up (67.0 -> 69.0 on piqa), stderr 1 point each side
    r = cell("wiki-seed0", 3, "piqa")
    assert (r["source_value"], r["recovered_value"]) == (pytest.approx(67.0), pytest.approx(69.0))
    assert r["delta"] == pytest.approx(2.0) and r["delta_pct"] == pytest.approx(200 / 67)
    assert r["delta_stderr"] == pytest.approx(math.sqrt(2)) and r["better"] == "yes"
    assert cell("wiki-seed0", 3, "mean_acc")["delta"] == pytest.approx(2.0)
    dense_mean = 100 * sum(DENSE_ACC.values()) / len(DENSE_ACC)
    assert cell("wiki-seed0", 3, "retention")["delta"] == pytest.approx(2.0 / dense_mean)
    r = cell("wiki-seed0", 3, "prefill_speedup")
    assert r["delta"] == pytest.approx(0.005) and r["better"] == "yes"
    r = cell("wiki-seed0", 3, "parameters")
    assert r["delta"] == 0 and r["better"] == ""
    # the right source: remove-6 of wiki-seed0 (not remove-3), 21 * ... : ppl 20 * 1.6 = 32 -> 41.6
    r = cell("wiki-seed0", 6, "ppl_wikitext2")
    assert r["source_value"] == pytest.approx(32.0) and r["delta"] == pytest.approx(9.6)
    r = cell("wiki-seed0", 6, "hellaswag")  # 50 - 6 = 44 -> 48
    assert r["source_value"] == pytest.approx(44.0) and r["delta"] == pytest.approx(4.0)
    r = cell("wiki-seed0", 6, "prefill_speedup")
    assert r["delta"] == pytest.approx(-0.01) and r["better"] == "no"
    # wiki-seed1, remove-3: 20 * 1.31 = 26.2 -> 31.44 on wikitext2, 30 * 1.31 = 39.3 -> 47.16 on c4
    assert cell("wiki-seed1", 3, "ppl_wikitext2")["source_value"] == pytest.approx(26.2)
    assert cell("wiki-seed1", 3, "ppl_c4")["delta"] == pytest.approx(39.3 * 0.2)
    assert cell("wiki-seed1", 3, "arc_easy")["source_value"] == pytest.approx(61.5)  # 65 - 3 - 0.5
    assert cell("wiki-seed1", 3, "prefill_speedup")["better"] == "same"
    # the dense model: 20 -> 19, every task one point up
    r = cell(None, 0, "ppl_wikitext2")
    assert r["source"] == "dense" and r["recovered"] == "dense+heal" and pd.isna(r["target"])
    assert r["delta"] == pytest.approx(-1.0) and r["delta_pct"] == pytest.approx(-5.0) and r["better"] == "yes"
    assert cell(None, 0, "boolq")["delta"] == pytest.approx(1.0)
    assert math.isnan(cell(None, 0, "prefill_speedup")["delta"])  # not timed
    assert cell(None, 0, "prefill_speedup")["better"] == ""


def test_a_recovered_model_without_its_source_has_nan_deltas(with_recovered):
    kept = [e for e in with_recovered if not (e["method"] == "flattengpt" and e["calibration"] == "wiki-seed1"
                                              and e["target"] == "remove-3")]
    deltas = report.recovery_table(report.results_table(kept))
    orphan = deltas[(deltas["calibration"] == "wiki-seed1") & (deltas["blocks_removed"] == 3)]
    assert len(orphan) and orphan["source_value"].isna().all() and orphan["delta"].isna().all()
    assert (orphan["recovered_value"].notna()).any()
    assert deltas[deltas["calibration"] == "wiki-seed0"]["delta"].notna().any()


def test_recovery_markdown_and_csv(with_recovered, tmp_path):
    deltas = report.recovery_table(report.results_table(with_recovered))
    csv, md = tmp_path / "report" / "recovery.csv", tmp_path / "report" / "recovery.md"
    report.write_recovery(deltas, csv, md, notes=["delta = recovered - source"])
    back = pd.read_csv(csv)
    assert back.shape == deltas.shape
    np.testing.assert_allclose(back["delta"], deltas["delta"].astype(float), equal_nan=True, rtol=0, atol=0)
    text = md.read_text()
    assert text.count("\n## ") == 4
    assert f"## {MODEL}: flattengpt+heal / remove-3 / wiki-seed0\n\nSource: flattengpt / remove-3 / wiki-seed0" in text
    assert f"## {MODEL}: dense+heal\n\nSource: dense; recovery setting heal." in text
    assert "| ppl_wikitext2 | 26.00 | 29.90 | +3.90 | +15.0% | – | no |" in text
    assert "| piqa | 67.0 | 69.0 | +2.0 | +3.0% | 1.4 | yes |" in text
    assert "| ppl_wikitext2 | 20.00 | 19.00 | -1.00 | -5.0% | – | yes |" in text
    assert "- delta = recovered - source" in text
    assert "| prefill_speedup | 1.000 | – | – | – | – | – |" in text  # the dense model's side only: not timed
    # a column without a value on either side is left out of the Markdown (kept in the CSV)
    blank = deltas.copy()
    blank.loc[blank["metric"] == "boolq", ["source_value", "recovered_value", "delta", "delta_pct"]] = np.nan
    assert "| boolq |" in text and "| boolq |" not in report.recovery_markdown(blank)
    assert "No recovered models." in report.recovery_markdown(report.recovery_table(report.results_table(
        [e for e in with_recovered if "recovered_from" not in e])))


def test_plot_lines_pair_recovered_with_source(with_recovered, tmp_path):
    table = report.results_table(with_recovered)
    lines = {line["label"]: line for line in report.vs_blocks_lines(table, "ppl_wikitext2", log_y=True)}
    assert set(lines) == {"drop", "flattengpt", "flattengpt+heal"}
    source, healed = lines["flattengpt"], lines["flattengpt+heal"]
    assert source["colour"] == healed["colour"] != lines["drop"]["colour"]
    assert healed["recovered"] and not source["recovered"] and not lines["drop"]["recovered"]
    # the recovered line starts at dense+heal (19) and goes through the mean of its calibrations
    assert healed["xs"] == [0, 3, 6]
    np.testing.assert_allclose(healed["mean"], [19.0, (29.9 + 26.2 * 1.2) / 2, 41.6])
    # the bar spans the two calibrations: 29.9 and 31.44 around 30.67
    np.testing.assert_allclose(healed["low"], [0, 0.77, 0], atol=1e-9)
    np.testing.assert_allclose(healed["high"], [0, 0.77, 0], atol=1e-9)
    assert healed["spread"]
    np.testing.assert_allclose(source["mean"], [20.0, (26.0 + 26.2) / 2, (32.0 + 32.2) / 2])
    # without dense+heal the recovered line has only its own points; dense+heal alone is a point in dense's colour
    no_dense = report.results_table([e for e in with_recovered if e["method"] != "dense+heal"])
    healed = {line["label"]: line for line in report.vs_blocks_lines(no_dense, "ppl_wikitext2")}["flattengpt+heal"]
    assert healed["xs"] == [3, 6]
    only_dense = report.results_table([e for e in with_recovered if e["method"] in ("dense", "dense+heal")])
    lines = report.vs_blocks_lines(only_dense, "ppl_wikitext2")
    assert [(line["label"], line["xs"], line["recovered"]) for line in lines] == [("dense", [0], False),
                                                                                   ("dense+heal", [0], True)]
    assert lines[0]["colour"] == lines[1]["colour"]
    path = tmp_path / "plots" / "ppl.png"
    report.plot_vs_blocks(table, "ppl_wikitext2", path, ylabel="ppl", title="ppl", log_y=True)
    assert is_png(path)
