rule compress:
    """Turn a plan into a smaller standard checkpoint (FlattenGPT, or the drop / flatten-only ablations)."""
    input:
        model="results/{model}/model.json",
        tokens="results/{model}/{calib}/tokens.safetensors",
        plan="results/{model}/{calib}/{target}/plan.json",
    output:
        directory("results/{model}/{calib}/{target}/{method}/model"),
    params:
        method=method_params,
        compute=compute_params,
        # Per-group progress lives outside the declared output, which Snakemake deletes before a rerun.
        state_dir="results/{model}/{calib}/{target}/.resume/{method}",
    threads: stage_threads("compress")
    resources:
        **stage_resources("compress"),
    retries: 1
    log:
        "results/{model}/{calib}/{target}/logs/compress.{method}.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/{target}/compress.{method}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/compress.py"
