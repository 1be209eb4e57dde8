# UperNet 160k on ADE20K 512x512 with DefMamba-T (release: segmentation/configs/defm, AdamW lr 6e-5, wd 0.01,
# 1500 linear warm-up iterations then poly decay, power 1).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/segmentation/upernet_defmamba-tiny_8xb2-160k_ade20k-512x512.py
# The DefMamba-S config with the DefMamba-T backbone; everything else is unchanged.
_base_ = "./upernet_defmamba-small_8xb2-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        embed_dim=48,
        depths=(2, 2, 5, 2),
        pretrained="pretrained/defmamba_tiny.pth",
    ),
    decode_head=dict(in_channels=[48, 96, 192, 384]),
    auxiliary_head=dict(in_channels=192),
)
