"""Rule `recover`: LoRA (or full) recovery tuning of a compressed checkpoint into a merged standard one."""
from flattengpt.runtime import job_provenance, start_job
from flattengpt.stages import recover_stage

start_job(snakemake)
recover_stage(snakemake.input.model, snakemake.input.checkpoint, dict(snakemake.params.recovery),
              dict(snakemake.params.compute), snakemake.params.state_dir, snakemake.output[0],
              job_provenance(snakemake))
