"""Rule `compress`: plan -> standard Hugging Face checkpoint with compression.json."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import compress_stage

start_job(snakemake)
compress_stage(snakemake.input.model, getattr(snakemake.input, "tokens", None), snakemake.input.plan,
               snakemake.output[0], snakemake.params.state_dir, dict(snakemake.params.method),
               dict(snakemake.params.compute), job_provenance(snakemake))
finish_job(snakemake)
