# Mask R-CNN 1x (12 epochs) on COCO with DefMamba-B (release: detection/configs/defm, AdamW lr 1e-4, wd 0.05).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_defmamba-base_fpn_1x_coco.py
# The DefMamba-S config of the same schedule with the DefMamba-B backbone; everything else is unchanged.
_base_ = "./mask-rcnn_defmamba-small_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        depths=(2, 3, 16, 2),
        pretrained="pretrained/defmamba_base.pth",
    ),
)
