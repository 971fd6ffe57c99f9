# maskworks: segmentation-mask workflow.  This file is the table of contents;
# helpers live in rules/common.smk, stages in one .smk file per arm.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/em.smk"
include: "rules/cryoet.smk"
include: "rules/codex.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
        refine_outputs,
