"""Rule `model`: resolve the model and describe it (results/{model}/model.json)."""
from flattengpt.runtime import finish_job, job_provenance, start_job
from flattengpt.stages import model_stage

start_job(snakemake)
info = model_stage(dict(snakemake.params.spec), snakemake.params.cache_dir, snakemake.output[0], job_provenance(snakemake))
# the manifest also records the model directory: every later stage reads it
finish_job(snakemake, covers={snakemake.output[0]: [info["path"]]})
