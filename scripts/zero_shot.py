"""Rule `zero_shot`: one lm-eval task, one model (dense or compressed)."""
from flattengpt.runtime import finish_job, job_provenance, optional_input, start_job
from flattengpt.stages import zero_shot_stage

start_job(snakemake)
zero_shot_stage(snakemake.input.model, optional_input(snakemake, "checkpoint"), snakemake.wildcards.task,
                dict(snakemake.params.options), dict(snakemake.params.compute), snakemake.output[0],
                job_provenance(snakemake))
finish_job(snakemake)
