# Mask R-CNN 1x (12 epochs) on COCO with DefMamba-B (release: detection/configs/defm, AdamW lr 1e-4, wd 0.05).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_defmamba-base_fpn_1x_coco.py
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"
custom_imports = dict(imports=["dense"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # no Swin keys pass through to DefMamba
        type="DefMambaBackbone",
        embed_dim=96,
        depths=(2, 3, 16, 2),
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/defmamba_base.pth",  # ImageNet checkpoint of the release (or of main.py)
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
# no weight decay on any LayerNorm (the release's `norm` key misses patch_embed.2/.7 and downsample.3)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images per iteration
