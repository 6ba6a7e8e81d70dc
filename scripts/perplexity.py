"""Rule `perplexity`: one corpus, one model (dense or compressed)."""
from flattengpt.runtime import job_provenance, optional_input, start_job
from flattengpt.stages import perplexity_stage

start_job(snakemake)
perplexity_stage(snakemake.input.model, optional_input(snakemake, "checkpoint"), snakemake.wildcards.corpus,
                 dict(snakemake.params.corpus), dict(snakemake.params.options), dict(snakemake.params.compute),
                 snakemake.output[0], job_provenance(snakemake))
