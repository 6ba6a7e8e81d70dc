# What each method removes or merges, as plan.json: `plan` for the methods that choose from the
# similarity views (cheap, local), `search` for those that search on the model (SLEB, LaCo, SLM).


rule plan:
    """A method's plan from the similarity views: FlattenGPT's greedy flattening plan, ShortGPT, Gromov, ..."""
    input:
        unpack(plan_inputs),
    output:
        "results/{model}/{calib}/{target}/{method}/plan.json",
    wildcard_constraints:
        method=method_names_regex("similarity"),
    params:
        target=target_spec,
        method=choice_params,
    log:
        "results/{model}/{calib}/{target}/logs/plan.{method}.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/plan.py"


rule search:
    """A method's plan from a search on the model and the calibration tokens (resumes after interruption)."""
    input:
        model="results/{model}/model.json",
        tokens="results/{model}/{calib}/tokens.safetensors",
    output:
        "results/{model}/{calib}/{target}/{method}/plan.json",
    wildcard_constraints:
        method=method_names_regex("model"),
    params:
        target=target_spec,
        method=choice_params,
        compute=compute_params,
        # Progress lives outside the declared output, which Snakemake deletes before a rerun.
        state_dir="results/{model}/{calib}/{target}/.resume/search.{method}",
    threads: stage_threads("search")
    resources:
        **stage_resources("search"),
    retries: 1
    log:
        "results/{model}/{calib}/{target}/logs/search.{method}.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/{target}/search.{method}.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/search.py"
