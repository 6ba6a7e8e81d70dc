rule model:
    """Resolve a model (local directory, hub id or embedded default) and describe it without loading weights."""
    input:
        model_source_files,
    output:
        "results/{model}/model.json",
    params:
        spec=model_spec,
        cache_dir=config["cache_dir"],
    log:
        "results/{model}/logs/model.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/model.py"
