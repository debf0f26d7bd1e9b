"""DP-FedSMP: sparsified model perturbation."""

from __future__ import annotations

from dataclasses import dataclass

from plateau.config import Params, key
from plateau.privacy.mechanism import Tensors, random_support
from plateau.seeds import stream_seed
from strategies.registry import Algorithm, register

from .aggregation import Aggregate
from .base import PlateauStrategy


@dataclass(frozen=True)
class SMPParams(Params):
    """The kept fraction of DP-FedSMP's public mask (key ``smp-keep``)."""

    prefix = "smp"
    keep: float = key(0.6, "fedsmp: fraction of coordinates kept by the round's public random "
                      "mask.", min=0, max=1, min_exclusive=True)


class FedSMP(PlateauStrategy):
    """DP-FedSMP.

    Hu, Guo and Gong, "Federated Learning with Sparsified Model Perturbation: Improving Accuracy
    under Client-Level Differential Privacy", IEEE TDSC 2023 (arXiv:2202.07178).

    Each round keeps a public random subset of the coordinates (fraction ``smp-keep``, the same
    mask for every client, derived from the seed and the round: it depends on no data). Clients
    sparsify their update to it, then clip, then noise only the kept coordinates, in that order
    (the authors' code noises before sparsifying and uses a data-dependent top-k). Server:
    x_{t+1} = x_t + mean(Delta) on the kept coordinates. With smp-keep = 1 it is DP-FedAvg.
    """

    paper = "Hu, Guo and Gong, IEEE TDSC 2023"
    server_state = "x"
    released = "update on a public random mask"

    local_rule = "sgd"

    def round_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """The public seed of this round's mask and the fraction it keeps."""
        return {"mask-seed": self.mask_seed(server_round),
                "mask-keep": self.config.hparams(SMPParams).keep}

    def mask_seed(self, server_round: int) -> int:
        return stream_seed(self.config.seed, "public-mask", server_round)

    def support(self, server_round: int) -> Tensors | None:
        """This round's mask over the trainable parameters."""
        return random_support(self.release_template(), self.config.hparams(SMPParams).keep,
                              self.mask_seed(server_round))

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """x <- x + mean(Delta), which is zero outside the mask."""
        mask = self.support(server_round)
        return {k: self.current[k] + aggregate.mean[k] * mask[k] for k in self.parameter_names}


register(Algorithm("fedsmp", FedSMP, params=(SMPParams,)))
