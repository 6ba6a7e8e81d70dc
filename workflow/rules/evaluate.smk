# Evaluation of every model, dense and compressed, one file per (model, measurement) so that each
# reruns on its own and a killed evaluation loses at most one task.


rule perplexity:
    """Perplexity on one corpus (METHOD.md section 6): non-overlapping windows, blockwise."""
    input:
        model="results/{model}/model.json",
        checkpoint=checkpoint_input,
        text=corpus_source_files,
    output:
        "results/{model}/{variant}/eval/perplexity/{corpus}.json",
    params:
        corpus=corpus_spec,
        options=perplexity_params,
        compute=blockwise_eval_compute,
        # Progress lives outside the declared output, which Snakemake deletes before a rerun.
        state_dir="results/{model}/{variant}/eval/.resume/perplexity.{corpus}",
    threads: stage_threads("perplexity")
    resources:
        **stage_resources("perplexity"),
    log:
        "results/{model}/{variant}/eval/logs/perplexity.{corpus}.log",
    benchmark:
        "results/benchmarks/{model}/{variant}/perplexity.{corpus}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/perplexity.py"


rule zero_shot:
    """One lm-eval task, zero-shot (stock task, or the shipped local config when data_dir is set)."""
    input:
        model="results/{model}/model.json",
        checkpoint=checkpoint_input,
        data=zero_shot_data_file,
    output:
        "results/{model}/{variant}/eval/zero_shot/{task}.json",
    params:
        options=zero_shot_params,
        compute=zero_shot_compute,
    threads: stage_threads("zero_shot")
    resources:
        **stage_resources("zero_shot"),
    log:
        "results/{model}/{variant}/eval/logs/zero_shot.{task}.log",
    benchmark:
        "results/benchmarks/{model}/{variant}/zero_shot.{task}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/zero_shot.py"


rule speed:
    """Prefill throughput and KV-cached decode latency, dense and compressed timed in one process."""
    input:
        model="results/{model}/model.json",
        checkpoint="results/{model}/{calib}/{target}/{method}/model",
    output:
        "results/{model}/{calib}/{target}/{method}/eval/speed.json",
    params:
        options=config["evaluation"]["speed"],
        compute=eval_compute,
        # Finished timed rounds live outside the declared output, which Snakemake deletes before a rerun.
        state_dir="results/{model}/{calib}/{target}/{method}/eval/.resume/speed",
    # Timings need the machine to themselves: ask for all cores, so no other job runs beside it.
    threads: stage_threads("speed")
    resources:
        **stage_resources("speed"),
    log:
        "results/{model}/{calib}/{target}/{method}/eval/logs/speed.log",
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/speed.py"


rule generate:
    """Greedy completions of the fixed prompts, for the report."""
    input:
        model="results/{model}/model.json",
        checkpoint=checkpoint_input,
    output:
        "results/{model}/{variant}/eval/generations.json",
    params:
        options=config["evaluation"]["generation"],
        compute=eval_compute,
    threads: stage_threads("generate")
    resources:
        **stage_resources("generate"),
    log:
        "results/{model}/{variant}/eval/logs/generate.log",
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/generate.py"
