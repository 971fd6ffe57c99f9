# Multiplexed-tissue (CODEX/PhenoCycler) arm: patches with QC, segmentation (Mesmer in its own
# TensorFlow environment, InstanSeg in the torch one, watershed or nuclear expansion in the core
# one), cell-nucleus repair, stitching, quantification,
# and (codex.spatialdata) a SpatialData store of each image in its own Python 3.12 environment.


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
        model=segment_model,
    output:
        segment=directory("results/codex/{name}/segment"),
    log:
        "logs/codex/segment_cells/{name}.log",
    benchmark:
        "benchmarks/codex/segment_cells/{name}.tsv"
    conda:
        conda_env(SEGMENT_ENV)
    container:
        container_image(SEGMENT_ENV)
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
        # in memory: about 40 bytes a pixel (five uint32 label images and the repair's work arrays);
        # a slide above the budget (codex.stitch.memory_mb) goes through label stores in that budget
        mem_mb=scaled(3000, "mem_mb", per_pixel=40, cap_mb=STITCH_CAP_MB),
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
    threads: CODEX["quantify"]["threads"]
    resources:
        **site_resources(),
        # the whole slide at once: 3000 MB + a 256 MB block + ~12 bytes a pixel at 50 channels; larger
        # slides keep to the budget (codex.quantify.memory_mb): the tables, then blocks of the rest
        mem_mb=scaled(3256, "mem_mb", per_pixel=12, cap_mb=QUANTIFY_CAP_MB),
        runtime=scaled(60, "runtime"),
    params:
        quantify=stage_params(CODEX["quantify"], drop=("threads",)),
        image_mpp=lambda wc: codex_channels(wc)["image_mpp"],
        nuclear_channel=lambda wc: codex_channels(wc)["nuclear_channel"],
    script:
        "../scripts/quantify.py"


rule spatialdata:
    # spatialdata 0.8 needs Python 3.12: the scverse environment (codex.spatialdata.enabled).
    input:
        unpack(codex_inputs),
        stitch="results/codex/{name}/stitch",
        quantify="results/codex/{name}/quantify",
    output:
        store=directory("results/codex/{name}/spatialdata.zarr"),
        stats="results/codex/{name}/spatialdata_stats.json",
    log:
        "logs/codex/spatialdata/{name}.log",
    benchmark:
        "benchmarks/codex/spatialdata/{name}.tsv"
    conda:
        conda_env("scverse")
    container:
        container_image("scverse")
    threads: 2
    resources:
        **site_resources(),
        mem_mb=scaled(4000, "mem_mb"),
        runtime=scaled(60, "runtime"),
    params:
        python=scverse_python,
        args=spatialdata_args,
    shell:
        "{params.python:q} -I -m maskworks.cli -v write-spatialdata {input.image:q} {input.stitch:q} "
        "{input.quantify:q} {output.store:q} {params.args} > {log:q} 2>&1"
