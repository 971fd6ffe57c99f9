# Multiplexed-tissue (CODEX/PhenoCycler) arm: patches with QC, Mesmer (or watershed)
# segmentation in its own TensorFlow environment, cell-nucleus repair, stitching.


localrules:
    download_mesmer_model,


rule tile_image:
    input:
        unpack(codex_inputs),
    output:
        tiles=directory("results/codex/{name}/tiles"),
    log:
        "logs/codex/tile_image/{name}.log",
    benchmark:
        "benchmarks/codex/tile_image/{name}.tsv"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(8000, "mem_mb"),
        runtime=scaled(30, "runtime"),
    params:
        tile=stage_params(CODEX["tile_image"]),
        channels=codex_channels,
    script:
        "../scripts/tile_image.py"


rule download_mesmer_model:
    # Compute nodes often have no internet: this runs once, on the submit host.
    output:
        directory(MESMER_DOWNLOAD),
    log:
        "logs/codex/download_mesmer_model.log",
    benchmark:
        "benchmarks/codex/download_mesmer_model.tsv"
    conda:
        conda_env("deepcell")
    container:
        container_image("deepcell")
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        python=deepcell_python,
    shell:
        "{params.python:q} -I -m maskworks.cli download-mesmer-model {output:q} > {log:q} 2>&1"


rule segment_cells:
    input:
        tiles="results/codex/{name}/tiles",
        model=mesmer_model,
    output:
        segment=directory("results/codex/{name}/segment"),
    log:
        "logs/codex/segment_cells/{name}.log",
    benchmark:
        "benchmarks/codex/segment_cells/{name}.tsv"
    conda:
        conda_env("deepcell")
    container:
        container_image("deepcell")
    threads: 2
    resources:
        **site_resources(gpu=SEGMENT_GPU),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(120, "runtime"),
        gpu=SEGMENT_GPU,
    params:
        python=segment_python,
        args=segment_args,
    shell:
        "{params.python:q} -I -m maskworks.cli -v segment-cells {input.tiles:q} {output.segment:q} "
        "{params.args} > {log:q} 2>&1"


rule repair_masks:
    input:
        segment="results/codex/{name}/segment",
        tiles="results/codex/{name}/tiles",
    output:
        repair=directory("results/codex/{name}/repair"),
    log:
        "logs/codex/repair_masks/{name}.log",
    benchmark:
        "benchmarks/codex/repair_masks/{name}.tsv"
    # Repair and stitching are short CPU steps: one submission per image.
    group:
        "codex_post"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(8000, "mem_mb"),
        runtime=scaled(30, "runtime"),
    script:
        "../scripts/repair_masks.py"


rule stitch:
    input:
        tiles="results/codex/{name}/tiles",
        repair="results/codex/{name}/repair",
    output:
        stitch=report(
            directory("results/codex/{name}/stitch"),
            patterns=["{qcname}_qc.png"],
            caption="report/codex_stitch.rst",
            category="multiplexed tissue",
            subcategory="{name}",
        ),
    log:
        "logs/codex/stitch/{name}.log",
    benchmark:
        "benchmarks/codex/stitch/{name}.tsv"
    group:
        "codex_post"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(60, "runtime"),
    params:
        stitch=stage_params(CODEX["stitch"]),
    script:
        "../scripts/stitch.py"


rule quantify:
    input:
        unpack(codex_inputs),
        stitch="results/codex/{name}/stitch",
    output:
        quantify=report(
            directory("results/codex/{name}/quantify"),
            patterns=["{qcname}_qc.png"],
            caption="report/codex_quantify.rst",
            category="multiplexed tissue",
            subcategory="{name}",
        ),
    log:
        "logs/codex/quantify/{name}.log",
    benchmark:
        "benchmarks/codex/quantify/{name}.tsv"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(16000, "mem_mb"),
        runtime=scaled(60, "runtime"),
    params:
        quantify=stage_params(CODEX["quantify"]),
        image_mpp=lambda wc: codex_channels(wc)["image_mpp"],
    script:
        "../scripts/quantify.py"
