rule plan:
    """Greedy flattening plan (METHOD.md section 2) from the cosine matrix, or a validated hand-written plan."""
    input:
        model=MODEL_DIR + "/model.json",
        cosine=CALIB_DIR + "/similarity/cosine.csv",
        plan_file=plan_file_input,
    output:
        TARGET_DIR + "/plan.json",
    params:
        target=target_spec,
    log:
        TARGET_DIR + "/logs/plan.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/plan.py"
