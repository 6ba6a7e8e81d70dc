"""Rule `similarity`: cosine, block influence, angular distance and CKA (CSV + PNG + similarity.json)."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import similarity_stage

start_job(snakemake)
similarity_stage(snakemake.input.model, snakemake.input.activations, snakemake.params.out_dir, dict(snakemake.params.options),
                 job_provenance(snakemake))
finish_job(snakemake)
