rule calibration:
    """Tokenize the calibration text and draw n_samples random windows of seq_len tokens."""
    input:
        model="results/{model}/model.json",
    output:
        tokens="results/{model}/{calib}/tokens.safetensors",
        info="results/{model}/{calib}/calibration.json",
    params:
        spec=calibration_spec,
    log:
        "results/{model}/{calib}/logs/calibration.log",
    # Cheap, and hub datasets need the internet, which compute nodes often lack.
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/calibration.py"
