# One table, its plots and sample generations for every evaluated model; tagged for `snakemake --report`.


def report_entries():
    """What the report reads about each evaluated model (paths relative to the working directory)."""
    evaluation = config["evaluation"]
    entries = []
    for model, variant in evaluated_variants():
        base = f"results/{model}/{variant}"
        dense = variant == "dense"
        calib, target, method = (None, None, "dense") if dense else variant.split("/")
        entries.append({
            "model": model, "calibration": calib, "target": target, "method": method,
            "model_json": f"results/{model}/model.json",
            "model_dir": None if dense else f"{base}/model",
            "compression_json": None if dense else f"{base}/model/compression.json",
            "plan_json": None if dense else f"results/{model}/{calib}/{target}/plan.json",
            "perplexity": {c: f"{base}/eval/perplexity/{c}.json" for c in evaluation["perplexity"]["corpora"]},
            "zero_shot": {t: f"{base}/eval/zero_shot/{t}.json" for t in evaluation["zero_shot"]["tasks"]},
            "speed": f"{base}/eval/speed.json" if evaluation["speed"]["enabled"] and not dense else None,
            "generations": f"{base}/eval/generations.json",
        })
    return entries


def report_plans():
    return [{"model": run["model"], "calibration": run["calibration"], "target": run["target"],
             "cosine_csv": f"results/{run['model']}/{run['calibration']}/similarity/cosine.csv",
             "plan_json": f"results/{run['model']}/{run['calibration']}/{run['target']}/plan.json",
             "figure": f"results/report/plans/{run['model']}.{run['calibration']}.{run['target']}.png"}
            for run in runs(config)]


rule report:
    """Gather every result into results/report/: table (CSV + Markdown), plots, sample generations."""
    input:
        evaluations=[f for model, variant in evaluated_variants() for f in evaluation_outputs(model, variant)],
        checkpoints=[f"results/{model}/{variant}/model" for model, variant in compressed_variants()],
        plans=[plan["plan_json"] for plan in report_plans()],
        cosine=[plan["cosine_csv"] for plan in report_plans()],
    output:
        csv=report("results/report/results.csv", caption="../report/results.rst", category="1. Results"),
        markdown="results/report/results.md",
        record="results/report/report.json",
        generations=report("results/report/generations.md", caption="../report/generations.rst",
                           category="3. Generations"),
        perplexity=[report(f"results/report/perplexity_{corpus}.png", caption="../report/perplexity.rst",
                           category="2. Plots", labels={"figure": f"perplexity on {corpus}"})
                    for corpus in config["evaluation"]["perplexity"]["corpora"]],
        accuracy=[report("results/report/accuracy.png", caption="../report/accuracy.rst", category="2. Plots",
                         labels={"figure": "mean zero-shot accuracy"})]
                 if config["evaluation"]["zero_shot"]["tasks"] else [],
        plan_figures=[report(plan["figure"], caption="../report/plan.rst", category="4. Plans",
                             labels={"model": plan["model"], "calibration": plan["calibration"],
                                     "target": plan["target"]})
                      for plan in report_plans()],
    params:
        entries=report_entries(),
        plans=report_plans(),
        config=config,
    log:
        "results/report/logs/report.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/report.py"
