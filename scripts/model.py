"""Rule `model`: resolve the model and describe it (results/{model}/model.json)."""
from flattengpt.runtime import job_provenance, start_job
from flattengpt.stages import model_stage

start_job(snakemake)
model_stage(dict(snakemake.params.spec), snakemake.params.cache_dir, snakemake.output[0], job_provenance(snakemake))
