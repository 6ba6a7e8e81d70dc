# One table, its plots and sample generations for every evaluated model; tagged for `snakemake --report`.


rule report:
    """Gather every result into results/report/: table (CSV + Markdown), plots, sample generations."""
    input:
        evaluations=[f for model, variant in evaluated_variants() for f in evaluation_outputs(model, variant)],
        checkpoints=[f"results/{model}/{variant}/model" for model, variant in compressed_variants() + recovered_variants()],
        plans=[path for plan in report_plans() for path in plan["plan_jsons"].values()],
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
        lambda_picks=[report("results/report/lambda_picks.png", caption="../report/lambda_picks.rst",
                             category="2. Plots", labels={"figure": "validated lambda per group"})]
                     if validated_lambda_methods() else [],
        lambda_picks_csv=["results/report/lambda_picks.csv"] if validated_lambda_methods() else [],
        recovery_csv=[report("results/report/recovery.csv", caption="../report/recovery.rst", category="1. Results")]
                     if recovered_variants() else [],
        recovery_markdown=["results/report/recovery.md"] if recovered_variants() else [],
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
