# Pretrained weights named by torchvision (downloaded with torchvision's hash check when online), or given by
# URL (weights.url, e.g. DeiT-S; cached under weights/url/). Local files (weights.path) are used in place.


rule fetch_weights:
    output:
        weights=f"{config['weights_dir']}/{{name}}.pth",
    wildcard_constraints:
        name=r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+",
    params:
        job=job_params(),
    conda:
        ENV
    log:
        f"{L}/weights/{{name}}.log",
    script:
        "../workflow_scripts/fetch_weights.py"


rule fetch_url_weights:
    output:
        weights=f"{config['weights_dir']}/url/{{name}}",
    params:
        job=job_params(url=lambda w: weights_url(w.name)),
    conda:
        ENV
    log:
        f"{L}/weights/url/{{name}}.log",
    script:
        "../workflow_scripts/fetch_weights.py"
