rule calibration:
    """Tokenize the calibration text and draw n_samples random windows of seq_len tokens."""
    input:
        model=MODEL_DIR + "/model.json",
    output:
        tokens=CALIB_DIR + "/tokens.safetensors",
        info=CALIB_DIR + "/calibration.json",
    params:
        spec=calibration_spec,
    log:
        CALIB_DIR + "/logs/calibration.log",
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/calibration.py"
