rule activations:
    """X_0 .. X_L, the input of every block, computed one block at a time (resumes after interruption)."""
    input:
        model="results/{model}/model.json",
        tokens="results/{model}/{calib}/tokens.safetensors",
    output:
        directory("results/{model}/{calib}/activations"),
    params:
        options=config["activations"],
        compute=compute_params,
        # Resume state lives outside the declared output, which Snakemake deletes before a rerun.
        state_dir="results/{model}/{calib}/.resume/activations",
    threads: stage_threads("activations")
    resources:
        **stage_resources("activations"),
    retries: 1
    log:
        "results/{model}/{calib}/logs/activations.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/activations.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/activations.py"
