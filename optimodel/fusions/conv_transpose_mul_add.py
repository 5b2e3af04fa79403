"""conv-transpose-mul-add: a per-channel constant Mul / Add / Sub / Div after a ConvTranspose.

Paddle2ONNX writes a ConvTranspose's bias as a separate Add of a [1, C, 1, 1] constant,
which then also keeps a following BatchNormalization from folding (conv-bn needs the
ConvTranspose right before it). It is conv-mul-add with ConvTranspose as the producer:
`scale_weight` and `output_channels` handle its weight layout ([C_in, C_out / group, k...]).
"""

from __future__ import annotations

from optimodel.fusions import register
from optimodel.fusions.conv_mul_add import ConvMulAdd


@register
class ConvTransposeMulAdd(ConvMulAdd):
    name = "conv-transpose-mul-add"
    order = 26
    summary = "ConvTranspose followed by Mul/Add/Sub/Div by a per-channel constant folded into it"
    conv_op = "ConvTranspose"
