"""Dec-LoRA (arXiv 2501.15361): K local steps on both factors, then every peer averages each
factor with its neighbours' (A_i <- sum_j W_ij A_j, B_i <- sum_j W_ij B_j)."""

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register


@register
class DecLoRA(Algorithm):
    name = "dec-lora"
    label = "Dec-LoRA"
