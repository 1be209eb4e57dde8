# UperNet 160k on ADE20K 512x512 with VMamba-T[s1l8]
# (VMamba release: segmentation/configs/vssm1 on MMSegmentation's Swin UperNet config,
# AdamW lr 6e-5, wd 0.01, 1500 linear warm-up iterations then poly decay, power 1).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/segmentation/upernet_vmamba-tiny_8xb2-160k_ade20k-512x512.py
# The DefMamba-S config (the project's recipe) with the VMamba-T backbone.
_base_ = "./upernet_defmamba-small_8xb2-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        _delete_=True,  # no DefMamba keys pass through to VMamba
        type="VMambaBackbone",
        embed_dim=96,
        depths=(2, 2, 8, 2),
        ssm_ratio=1.0,
        drop_path_rate=0.2,  # the release's ADE20K value (its ImageNet one)
        out_indices=(0, 1, 2, 3),
        pretrained="pretrained/vmamba_tiny.pth",  # ImageNet checkpoint (the release's or main.py's)
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
