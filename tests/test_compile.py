"""torch.compile(fullgraph=True) of a tiny DefMamba on the CPU equals eager mode (logits and gradients).

fullgraph=True fails on any graph break, so this also checks that the scan's custom op and the
deformable operations trace. Inductor compiles C++ on the CPU: the model is as small as it gets.
"""
import copy

import torch
import torch._inductor.config as inductor_config

from models.defmamba import DefMamba


def test_compiled_tiny_defmamba_equals_eager():
    torch.manual_seed(0)
    model = DefMamba(num_classes=5, embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3),
                     drop_path_rate=0.0)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)

    logits = model(x)
    logits.square().sum().backward()
    with inductor_config.patch(compile_threads=1):  # a pool of compile workers costs more than it saves here
        logits_c = compiled(x)
        logits_c.square().sum().backward()

    torch.testing.assert_close(logits_c, logits, rtol=1e-4, atol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in compiled_model.named_parameters():
        g = grads[name].grad
        scale = g.abs().max().item() or 1.0
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
