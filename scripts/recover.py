"""Rules `recover` and `recover_dense`: LoRA (or full) recovery tuning of a compressed checkpoint (or of the
dense model, which has no checkpoint input) into a merged standard one."""
from flattengpt.runtime import finish_job, job_provenance, optional_input, start_job
from flattengpt.stages import recover_stage

start_job(snakemake)
recover_stage(snakemake.input.model, optional_input(snakemake, "checkpoint"), dict(snakemake.params.recovery),
              dict(snakemake.params.compute), snakemake.params.state_dir, snakemake.output[0],
              job_provenance(snakemake))
finish_job(snakemake)
