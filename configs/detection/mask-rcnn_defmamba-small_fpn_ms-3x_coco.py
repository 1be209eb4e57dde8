# Mask R-CNN 3x (36 epochs, multi-scale crop) on COCO with DefMamba-S (release: detection/configs/defm, AdamW lr 1e-4, wd 0.05).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_defmamba-small_fpn_ms-3x_coco.py
# The 1x config of the same size (model, optimizer, batch size) with the 3x schedule and the multi-scale + crop
# training pipeline of MMDetection's Swin-T ms-crop-3x config.
_base_ = "./mask-rcnn_defmamba-small_fpn_1x_coco.py"

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    _base_.param_scheduler[0],  # linear warm-up over 1000 iterations, unchanged
    dict(_base_.param_scheduler[1], end=max_epochs, milestones=[27, 33]),
]

# the fixed (1333, 800) Resize is replaced by a random choice of multi-scale resize, or resize + crop + resize
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
# the top-level copy keeps the `_scope_` that mmengine gives the variables of an mmdet:: base
train_pipeline = [dict(t, _scope_="mmdet") for t in train_pipeline]
