# Mask R-CNN 3x (36 epochs, multi-scale crop) on COCO with DefMamba-T (release: detection/configs/defm, AdamW lr 1e-4, wd 0.05).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/detection/mask-rcnn_defmamba-tiny_fpn_ms-3x_coco.py
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py"
custom_imports = dict(imports=["dense"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # no Swin keys pass through to DefMamba
        type="DefMambaBackbone",
        embed_dim=48,
        depths=(2, 2, 5, 2),
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/defmamba_tiny.pth",  # ImageNet checkpoint of the release (or of main.py)
    ),
    neck=dict(in_channels=[48, 96, 192, 384]),
)
# no weight decay on any LayerNorm (the release's `norm` key misses patch_embed.2/.7 and downsample.3)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images per iteration
