# FlattenGPT depth compression: model -> calibration tokens -> activations -> similarity -> plan.
# Run `snakemake --cores 2` (default config.yaml) or point --configfile at your own config.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/similarity.smk"
include: "workflow/rules/plan.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
