# wsss-flow: weakly-supervised semantic segmentation, from dataset to mIoU report.
# Targets: <dataset>_<suite>_report (e.g. toy_cam_report, toy_fsae_report, voc_fsae_report),
# <dataset>_<experiment>_export (pseudo-masks and CAMs in reference layouts) and `all` (the demo).
# Settings: config.yaml (schema: schemas/config.schema.yaml). Library: wsss_core/.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# wsss_core is importable here and in every job (plain, conda or container env) without being installed.
sys.path.insert(0, workflow.basedir)
from wsss_core.pipeline import export_library_path

export_library_path(workflow.basedir)


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/weights.smk"
include: "rules/saliency.smk"
include: "rules/superpixels.smk"
include: "rules/classifier.smk"
include: "rules/cams.smk"
include: "rules/refine.smk"
include: "rules/affinity.smk"
include: "rules/irn.smk"
include: "rules/segmentation.smk"
include: "rules/single_stage.smk"
include: "rules/submission.smk"
include: "rules/exchange.smk"
include: "rules/report.smk"


rule all:
    input:
        report_md("toy", "cam"),
    default_target: True


for _dataset in config["datasets"]:
    for _suite in config["suites"]:

        rule:
            name:
                f"{_dataset}_{_suite}_report"
            input:
                report_md(_dataset, _suite),

    for _experiment in config["experiments"]:

        rule:
            name:
                f"{_dataset}_{_experiment}_export"
            input:
                P.path("export", dataset=_dataset, experiment=_experiment),
