# Mask R-CNN 1x (12 epochs) on COCO with VMamba-S[s2l15]
# (VMamba release: detection/configs/vssm1 on MMDetection's Swin-T config, AdamW lr 1e-4, wd 0.05).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_vmamba-small_fpn_1x_coco.py
# The DefMamba-S config of the same schedule (the project's recipe) with the VMamba-S backbone.
_base_ = "./mask-rcnn_defmamba-small_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        _delete_=True,  # no DefMamba keys pass through to VMamba
        type="VMambaBackbone",
        embed_dim=96,
        depths=(2, 2, 15, 2),
        ssm_ratio=2.0,
        drop_path_rate=0.3,  # the ImageNet value (docs/dense.md)
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/vmamba_small.pth",  # ImageNet checkpoint (the release's or main.py's)
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
