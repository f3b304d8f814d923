# Pretrained weights named by torchvision (downloaded with torchvision's hash check when online).
# Local files (weights.path) are used in place and never downloaded.


rule fetch_weights:
    output:
        f"{config['weights_dir']}/{{name}}.pth",
    wildcard_constraints:
        name=r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+",
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/weights/{{name}}.log",
    script:
        "../workflow_scripts/fetch_weights.py"
