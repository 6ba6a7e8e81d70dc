"""Rule `search`: a method's plan from a search on the model (SLEB, LaCo, SLM), resumable."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import search_stage

start_job(snakemake)
search_stage(snakemake.input.model, snakemake.input.tokens, dict(snakemake.params.target),
             dict(snakemake.params.method), dict(snakemake.params.compute), snakemake.params.state_dir,
             snakemake.output[0], job_provenance(snakemake))
finish_job(snakemake)
