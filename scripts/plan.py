"""Rule `plan`: the greedy flattening plan, or a validated hand-written one (plan.json)."""
from flattengpt.runtime import job_provenance, start_job
from flattengpt.stages import plan_stage

start_job(snakemake)
plan_stage(snakemake.input.model, snakemake.input.cosine, dict(snakemake.params.target), snakemake.output[0],
           job_provenance(snakemake))
