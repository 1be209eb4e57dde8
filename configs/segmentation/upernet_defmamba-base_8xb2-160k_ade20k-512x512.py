# UperNet 160k on ADE20K 512x512 with DefMamba-B (release: segmentation/configs/defm, AdamW lr 6e-5, wd 0.01,
# 1500 linear warm-up iterations then poly decay, power 1).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/segmentation/upernet_defmamba-base_8xb2-160k_ade20k-512x512.py
_base_ = "mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"
custom_imports = dict(imports=["dense"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # no Swin keys pass through to DefMamba
        type="DefMambaBackbone",
        embed_dim=96,
        depths=(2, 3, 16, 2),
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/defmamba_base.pth",  # ImageNet checkpoint of the release (or of main.py)
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)
# no weight decay on any LayerNorm (the release's `norm` key misses patch_embed.2/.7 and downsample.3)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images per iteration
