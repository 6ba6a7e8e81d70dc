"""Rule `activations`: X_0 .. X_L one block at a time, resumable (activations/layer_*.safetensors)."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import activations_stage

start_job(snakemake)
activations_stage(snakemake.input.model, snakemake.input.tokens, snakemake.output[0], snakemake.params.state_dir,
                  dict(snakemake.params.options), dict(snakemake.params.compute), job_provenance(snakemake))
finish_job(snakemake)
