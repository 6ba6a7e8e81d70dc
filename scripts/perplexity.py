"""Rule `perplexity`: one corpus, one model (dense or compressed), resumable."""
from flattengpt.runtime import finish_job, job_provenance, optional_input, start_job
from flattengpt.stages import perplexity_stage

start_job(snakemake)
# checkpoint_every is read from the config, not from params: it does not change the result, so
# changing it must not rerun finished evaluations.
perplexity_stage(snakemake.input.model, optional_input(snakemake, "checkpoint"), snakemake.wildcards.corpus,
                 dict(snakemake.params.corpus), dict(snakemake.params.options), dict(snakemake.params.compute),
                 snakemake.output[0], job_provenance(snakemake), state_dir=snakemake.params.state_dir,
                 checkpoint_every=snakemake.config["evaluation"]["perplexity"]["checkpoint_every"])
finish_job(snakemake)
