"""Rule `speed`: dense vs compressed prefill throughput and decode latency, timed in one process, resumable."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import speed_stage

start_job(snakemake)
speed_stage(snakemake.input.model, snakemake.input.checkpoint, dict(snakemake.params.options),
            dict(snakemake.params.compute), snakemake.output[0], job_provenance(snakemake),
            state_dir=snakemake.params.state_dir)
finish_job(snakemake)
