"""Rule `plan`: a method's plan from the similarity views (plan.json)."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import plan_stage

start_job(snakemake)
similarity = {name: getattr(snakemake.input, name) for name in ("cosine", "angular_distance", "block_influence")}
plan_stage(snakemake.input.model, similarity, dict(snakemake.params.target), dict(snakemake.params.method),
           snakemake.output[0], job_provenance(snakemake))
finish_job(snakemake)
