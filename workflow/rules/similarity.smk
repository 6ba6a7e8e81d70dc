rule similarity:
    """Token-mean cosine, ShortGPT block influence, Gromov angular distance and linear CKA, as CSV + PNG."""
    input:
        activations=CALIB_DIR + "/activations",
    output:
        [CALIB_DIR + "/similarity/" + name for name in SIMILARITY_FILES],
    params:
        options=config["similarity"],
        out_dir=CALIB_DIR + "/similarity",
    threads: config["compute"]["threads"]
    log:
        CALIB_DIR + "/logs/similarity.log",
    benchmark:
        RESULTS + "/benchmarks/{model}/{calib}/similarity.tsv"
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/similarity.py"
