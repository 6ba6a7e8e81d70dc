# FlattenGPT depth compression: model -> calibration tokens -> activations -> similarity -> plan -> compressed model
# -> evaluation (perplexity, zero-shot, speed, generations) -> report.
# Run `snakemake --cores 2` (default config.yaml) or point --configfile at your own config.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from flattengpt.config import ConfigError, validate_config

min_version("9.0")


# `--configfile my.yaml` replaces config.yaml rather than being merged into it key by key (Snakemake's
# default), which would add the default model, calibration and targets to every other config.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# Schema (with defaults) and semantic checks, all problems at once, before any job starts.
try:
    validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
except ConfigError as err:
    raise WorkflowError(str(err))


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/similarity.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
