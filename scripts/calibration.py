"""Rule `calibration`: seeded token windows (tokens.safetensors + calibration.json)."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import calibration_stage

start_job(snakemake)
calibration_stage(snakemake.input.model, dict(snakemake.params.spec), snakemake.output.tokens,
                  snakemake.output.info, job_provenance(snakemake))
finish_job(snakemake)
