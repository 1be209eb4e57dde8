# UperNet 160k on ADE20K 512x512 with Mamba-Adaptor-b2
# (paper: UperNet in MMSegmentation, VMamba's schedule;
# AdamW lr 6e-5, wd 0.01, 1500 linear warm-up iterations then poly decay, power 1).
# Train: torchrun --nproc_per_node 8 dense/train.py configs/segmentation/upernet_mamba-adaptor-b2_8xb2-160k_ade20k-512x512.py
# The DefMamba-S config (the project's recipe) with the Mamba-Adaptor-b2 backbone.
_base_ = "./upernet_defmamba-small_8xb2-160k_ade20k-512x512.py"

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
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
