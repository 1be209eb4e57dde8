# Mask R-CNN 3x (36 epochs, multi-scale crop) on COCO with Mamba-Adaptor-b2
# (paper: MMDetection, AdamW lr 1e-4, batch 16; wd 0.05 and the rest: the project's recipe).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_mamba-adaptor-b2_fpn_ms-3x_coco.py
# The DefMamba-S config of the same schedule (the project's recipe) with the Mamba-Adaptor-b2 backbone.
_base_ = "./mask-rcnn_defmamba-small_fpn_ms-3x_coco.py"

model = dict(
    backbone=dict(
        _delete_=True,  # no DefMamba keys pass through to Mamba-Adaptor
        type="MambaAdaptorBackbone",
        embed_dim=96,
        depths=(2, 2, 9, 2),
        ssm_ratio=1.0,
        drop_path_rate=0.2,  # the ImageNet value (no published dense one; docs/dense.md)
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/mamba_adaptor_b2.pth",  # ImageNet checkpoint (main.py's)
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
