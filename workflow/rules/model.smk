rule model:
    """Resolve a model (local directory, hub id or embedded default) and describe it without loading weights."""
    input:
        model_source_files,
    output:
        MODEL_DIR + "/model.json",
    params:
        spec=model_spec,
        cache_dir=config["cache_dir"],
    log:
        MODEL_DIR + "/logs/model.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/model.py"
