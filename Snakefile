# FlattenGPT depth compression: model -> calibration tokens -> activations -> similarity -> plan -> compressed model
# -> evaluation (perplexity, zero-shot, speed, generations) -> report.
# Run `snakemake --cores 2` (default config.yaml) or point --configfile at your own config.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from flattengpt.config import ConfigError, validate_config
from flattengpt.integrity import dry_run

min_version("9.0")


# `--configfile my.yaml` replaces config.yaml rather than being merged into it key by key (Snakemake's
# default), which would add the default model, calibration and targets to every other config.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# Schema (with defaults) and semantic checks, all problems at once, before any job starts.
config_warnings = []
try:
    validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
                    dry_run=dry_run(sys.argv), warnings=config_warnings)
except ConfigError as err:
    raise WorkflowError(str(err))
if workflow.is_main_process:
    for warning in config_warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    from flattengpt.config import device_warning
    from flattengpt.integrity import start_run

    warning = device_warning(config)  # an error on the node that runs the job (blockwise.resolve_device)
    if warning:
        print(f"Warning: {warning}", file=sys.stderr)
    # The run's id and command line for its jobs, then every finished artifact under results/ against
    # its manifest: nothing damaged passes for finished (flattengpt/integrity.py).
    refused = start_run(sys.argv, config["integrity"]["hash_max_mb"])
    if refused:
        raise WorkflowError(refused)


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/similarity.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/recover.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Locally, Snakemake ignores `resources: gpu` unless `--resources gpu=N` is given, and a job does not
# pick a card of its own (device auto/cuda is cuda:0), so GPU jobs would run on one card at once and
# run out of memory. Unless the user gave a gpu limit, or cluster.share_gpu allows it, local GPU
# jobs (each asks for one slot, see stage_resources) run one at a time. Cluster jobs get their own GPUs.
if (workflow.is_main_process and not cluster_run() and "gpu" not in workflow.global_resources
        and not config["cluster"]["share_gpu"]):
    workflow.register_resource("gpu", 1)


rule all:
    default_target: True
    input:
        all_outputs(),


onerror:
    # the failed jobs' own error lines (the field or file and the fix) on the console (flattengpt/failures.py)
    from flattengpt.failures import explain_failures

    try:
        explain_failures(log)
    except Exception as err:  # never hide Snakemake's own report behind a failure of this summary
        print(f"(could not summarise the failed jobs' logs: {err})", file=sys.stderr)


onstart:
    # Under the Slurm executor, never submit beside live jobs of a killed run (flattengpt/slurm.py).
    if workflow.executor_plugin is not None and workflow.executor_plugin.cli_prefix == "slurm":
        from flattengpt.slurm import refuse_orphans

        refuse_orphans(".")
