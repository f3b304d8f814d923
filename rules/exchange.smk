# Import and export: CAMs and pseudo-masks of another codebase (reference .npy layouts, PNG folders) converted once
# into shards (checked: ids, shapes, value ranges); any experiment's outputs written in those layouts.


rule import_cams:
    input:
        folder=import_folder("cams"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        cams=out("cams"),
    params:
        job=job_params("cams"),
    wildcard_constraints:
        experiment=imported_experiments("cams"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/import_cams/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/import_cams.py"


ruleorder: import_cams > infer_cams


rule import_masks:
    input:
        folder=import_folder("pseudo_masks"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("imported_masks"),
    params:
        job=job_params("imported_masks"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/import_masks/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/import_masks.py"


rule export:
    input:
        cams=all_cam_shards,
        masks=lambda w: shard_paths("pseudo_masks", w.dataset, w.experiment),
        cam_eval=rules.eval_cams.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        dir=directory(out("export")),
    params:
        job=job_params(
            "export",
            provenance=lambda w: P.provenance(w.dataset, w.experiment),
            config_hashes=lambda w: {a: P.hash(w.dataset, w.experiment, a) for a in ("cams", "pseudo_masks")},
        ),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/export.log",
    script:
        "../workflow_scripts/export.py"
