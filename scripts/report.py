"""Rule `report`: the results table, plots and sample generations of every evaluated model."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import report_stage

start_job(snakemake)
report_stage(list(snakemake.params.entries), list(snakemake.params.plans), dict(snakemake.output.items()),
             job_provenance(snakemake))
finish_job(snakemake)
