rule plan:
    """Greedy flattening plan (METHOD.md section 2) from the cosine matrix, or a validated hand-written plan."""
    input:
        model="results/{model}/model.json",
        cosine="results/{model}/{calib}/similarity/cosine.csv",
        plan_file=plan_file_input,
    output:
        "results/{model}/{calib}/{target}/plan.json",
    params:
        target=target_spec,
    log:
        "results/{model}/{calib}/{target}/logs/plan.log",
    localrule: True
    conda:
        "../../envs/flattengpt.yaml"
    script:
        "../../scripts/plan.py"
