# Volume-EM arm: classical texture tissue mask, then 3-D mask post-processing.


wildcard_constraints:
    name=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    method=r"texture|unet",


rule texture_mask:
    input:
        unpack(em_inputs),
    output:
        mask=directory("results/em/{name}/texture_mask.zarr"),
        confidence=intermediate(directory("results/em/{name}/texture_confidence.zarr")),
        stats="results/em/{name}/texture_stats.json",
        qc=report(
            "results/em/{name}/texture_qc.png",
            caption="report/texture_qc.rst",
            category="volume EM",
            subcategory="{name}",
        ),
    log:
        "logs/em/texture_mask/{name}.log",
    benchmark:
        "benchmarks/em/texture_mask/{name}.tsv"
    group:
        "em_mask"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: EM["texture_mask"]["threads"]
    resources:
        **site_resources(gpu=em_mask_gpu("texture")),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(120, "runtime"),
        gpu=gpu_request(EM["texture_mask"]["device"]),
    params:
        texture=stage_params(EM["texture_mask"], drop=("threads", "device")),
        device=job_device(EM["texture_mask"]["device"]),
        geometry=em_geometry,
        sources=em_sources,
    script:
        "../scripts/texture_mask.py"


rule train_unet:
    input:
        unpack(unet_training_inputs),
    output:
        best=protected("results/em/unet/best.pt"),
        metrics="results/em/unet/metrics.json",
        history="results/em/unet/history.csv",
        curves=report(
            "results/em/unet/curves.png",
            caption="report/unet_curves.rst",
            category="volume EM",
            subcategory="U-Net",
        ),
    log:
        "logs/em/train_unet.log",
    benchmark:
        "benchmarks/em/train_unet.tsv"
    conda:
        conda_env("monai")
    container:
        container_image("monai")
    threads: 2
    resources:
        **site_resources(gpu=gpu_request(UNET["device"])),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(480, "runtime"),
        gpu=gpu_request(UNET["device"]),
    params:
        train=stage_params(
            UNET, drop=("enabled", "training", "images_dir", "labels_dir", "device")
        ),
        device=job_device(UNET["device"]),
        sources=unet_training_sources,
    script:
        "../scripts/train_unet.py"


rule predict_unet:
    input:
        unpack(em_inputs),
        checkpoint="results/em/unet/best.pt",
    output:
        prob=intermediate(directory("results/em/{name}/unet_prob.zarr")),
        mask=directory("results/em/{name}/unet_mask.zarr"),
        stats="results/em/{name}/unet_stats.json",
        qc=report(
            "results/em/{name}/unet_qc.png",
            caption="report/unet_qc.rst",
            category="volume EM",
            subcategory="{name}",
        ),
    log:
        "logs/em/predict_unet/{name}.log",
    benchmark:
        "benchmarks/em/predict_unet/{name}.tsv"
    group:
        "em_mask"
    conda:
        conda_env("monai")
    container:
        container_image("monai")
    threads: EM["predict_unet"]["threads"]
    resources:
        **site_resources(gpu=em_mask_gpu("unet")),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(120, "runtime"),
        gpu=gpu_request(EM["predict_unet"]["device"]),
    params:
        predict=stage_params(EM["predict_unet"], drop=("device", "threads")),
        device=job_device(EM["predict_unet"]["device"]),
        geometry=em_geometry,
        sources=em_sources,
    script:
        "../scripts/predict_unet.py"


rule postprocess_mask:
    input:
        unpack(
            lambda wc: {
                "mask": f"results/em/{wc.name}/{wc.method}_mask.zarr",
                **em_inputs(wc),
            }
        ),
    output:
        mask=directory("results/em/{name}/{method}_final.zarr"),
        stats=report(
            "results/em/{name}/{method}_final_stats.json",
            caption="report/final_stats.rst",
            category="volume EM",
            subcategory="{name}",
        ),
        qc=report(
            "results/em/{name}/{method}_final_qc.png",
            caption="report/final_qc.rst",
            category="volume EM",
            subcategory="{name}",
        ),
    log:
        "logs/em/postprocess_mask/{name}_{method}.log",
    benchmark:
        "benchmarks/em/postprocess_mask/{name}_{method}.tsv"
    # A short step: submitted together with the job that made its mask.
    group:
        "em_mask"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: EM["postprocess_mask"]["threads"]
    resources:
        **site_resources(gpu=grouped_with_gpu_job),
        mem_mb=scaled(4000, "mem_mb"),
        runtime=scaled(30, "runtime"),
        gpu=gpu_request(EM["postprocess_mask"]["device"]),
    params:
        postprocess=stage_params(EM["postprocess_mask"], drop=("threads", "device")),
        device=job_device(EM["postprocess_mask"]["device"]),
        full_resolution_of=full_resolution_of,
        sources=em_sources,
    script:
        "../scripts/postprocess_mask.py"
