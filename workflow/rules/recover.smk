# Recovery tuning (LoRA by default) of every compressed model a `recovery:` setting names; the result is
# one more evaluated variant, results/{model}/{calib}/{target}/{method}+{recovery}/model. With `dense: true`
# the dense model is tuned the same way for comparison, into results/{model}/dense+{recovery}/model.


rule recover:
    """Fine-tune a compressed checkpoint (flattengpt.recover) and merge the adapter: a standard checkpoint."""
    input:
        unpack(recover_inputs),
    output:
        directory("results/{model}/{calib}/{target}/{method}+{recovery}/model"),
    params:
        recovery=recovery_params,
        compute=compute_params,
        # the adapter, optimizer, scheduler, RNG and data position every save_every steps, outside the output
        state_dir="results/{model}/{calib}/{target}/.resume/recover.{method}+{recovery}",
    wildcard_constraints:
        method=method_names_regex("any"),
        recovery=recovery_names_regex(),
    threads: stage_threads("recover")
    resources:
        **stage_resources("recover"),
    retries: 1
    log:
        "results/{model}/{calib}/{target}/logs/recover.{method}+{recovery}.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/{target}/recover.{method}+{recovery}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/recover.py"


rule recover_dense:
    """The same recovery tuning of the dense model (a setting with dense: true), to compare against."""
    input:
        unpack(recover_dense_inputs),
    output:
        directory("results/{model}/dense+{recovery}/model"),
    params:
        recovery=recovery_params,
        compute=compute_params,
        state_dir="results/{model}/.resume/recover.dense+{recovery}",
    wildcard_constraints:
        recovery=recovery_names_regex(),
    threads: stage_threads("recover")
    resources:
        **stage_resources("recover"),
    retries: 1
    log:
        "results/{model}/logs/recover.dense+{recovery}.log",
    benchmark:
        "results/benchmarks/{model}/recover.dense+{recovery}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/recover.py"
