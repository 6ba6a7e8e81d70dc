rule compress:
    """Turn a method's plan into a smaller standard checkpoint (every method; fitting ones read the tokens)."""
    input:
        unpack(compress_inputs),
    output:
        directory("results/{model}/{calib}/{target}/{method}/model"),
    wildcard_constraints:
        method=method_names_regex("any"),  # not a recovered model's {method}+{recovery}
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
