"""Rule `generate`: greedy completions of the fixed prompts, one model (dense or compressed)."""
from flattengpt.runtime import finish_job, job_provenance, optional_input, start_job
from flattengpt.stages import generation_stage

start_job(snakemake)
generation_stage(snakemake.input.model, optional_input(snakemake, "checkpoint"), dict(snakemake.params.options),
                 dict(snakemake.params.compute), snakemake.output[0], job_provenance(snakemake))
finish_job(snakemake)
