"""DeCAF (arXiv 2505.21382): train both factors; each peer averages its neighbours' *products*
B_j A_j and factors the average back to rank r by truncated SVD. Averaging factors separately
adds cross terms B_j A_k (j != k) that no peer trained; averaging products does not. The SVD
step is `declora.network.mixing.decaf_mix` (all peers) / `decaf_combine` (one peer)."""

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register
from declora.network.mixing import LORA_FACTORS


@register
class DeCAF(Algorithm):
    name = "decaf"
    label = "DeCAF"
    exact_messages_only = True
    needs_lora_factors = True
    mixing_rule = "product-svd"
    stale_after_mixing = True

    def stale_optimizer_state(self, round: int) -> frozenset[str]:
        """Every round's SVD re-factorization rotates each peer's factors into a new basis
        (B A is kept, B and A are not), so momentum built on the old factors would point the
        wrong way: it is cleared right after the mixing, for the peers that re-factored (an
        offline peer, or one left out of a pairing, keeps its own)."""
        return LORA_FACTORS
