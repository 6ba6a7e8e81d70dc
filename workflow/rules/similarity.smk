rule similarity:
    """Token-mean cosine, ShortGPT block influence, Gromov angular distance and linear CKA, as CSV + PNG."""
    input:
        model="results/{model}/model.json",
        activations="results/{model}/{calib}/activations",
    output:
        expand("results/{{model}}/{{calib}}/similarity/{file}", file=SIMILARITY_FILES),
    params:
        options=config["similarity"],
        out_dir="results/{model}/{calib}/similarity",
    threads: stage_threads("similarity")
    resources:
        **stage_resources("similarity"),
    # Cheap beside the GPU stages (it reads the token-capped stored copy once): no queue wait on a cluster.
    localrule: True
    log:
        "results/{model}/{calib}/logs/similarity.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/similarity.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/similarity.py"
