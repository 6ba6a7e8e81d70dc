rule activations:
    """X_0 .. X_L, the input of every block, computed one block at a time (resumes after interruption)."""
    input:
        model=MODEL_DIR + "/model.json",
        tokens=CALIB_DIR + "/tokens.safetensors",
    output:
        directory(CALIB_DIR + "/activations"),
    params:
        options=config["activations"],
        compute=compute_params,
        # Resume state lives outside the declared output, which Snakemake deletes before a rerun.
        state_dir=CALIB_DIR + "/.resume/activations",
    threads: config["compute"]["threads"]
    resources:
        gpu=lambda wc: 1 if config["compute"]["device"].startswith("cuda") else 0,
        runtime=lambda wc, attempt: 120 * attempt,
    retries: 1
    log:
        CALIB_DIR + "/logs/activations.log",
    benchmark:
        RESULTS + "/benchmarks/{model}/{calib}/activations.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/activations.py"
