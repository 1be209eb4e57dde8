"""Analysis tools for papers: effective receptive fields, activation maps at query tokens, throughput tables.

    python -m utils.analyze erf --model configs/demo.yaml@CKPT --model raster=configs/demo_raster.yaml@CKPT \\
        --stage 4 --images 32 --out erf.png
    python -m utils.analyze activation --model configs/demo.yaml@CKPT --stage 2 --query 0.5,0.5 --out act.png
    python -m utils.analyze throughput --model defmamba_tiny --model damamba_tiny --batch-sizes 64,128 \\
        --device cuda --out throughput.md

Every model is `[LABEL=]CONFIG.yaml|TIMM_NAME[@CHECKPOINT]` (inputs.py); several --model flags put the models
side by side in one figure. Images default to the embedded MNIST-5k validation digits; --data-path reads any
image folder (an ImageNet val split, say). The figures are PNGs drawn with matplotlib, and every number drawn
in them is also written to a JSON file beside the PNG (--json to choose its path).

    erf.py         the ERF measure (RepLKNet's: gradient of the central output, area ratios at 20/30/50/99 %)
    activation.py  the token mixer's response to query tokens (the paper's Fig. 4, VMamba's method)
    throughput.py  img/s and peak memory per model and batch, official figures beside ours, as markdown
    plots.py       the matplotlib figures
    inputs.py      model specs, images
"""
