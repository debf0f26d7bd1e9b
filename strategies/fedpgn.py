"""DP-FedPGN: a global gradient-norm penalty through the server's global direction c_t."""

from __future__ import annotations

from plateau.privacy import Tensors

from .shared import GlobalDirection


class FedPGN(GlobalDirection):
    """DP-FedPGN (with ``dp`` off: FedPGN).

    Liu, Tian, Shang et al., "DP-FedPGN: Finding Global Flat Minima for Differentially Private
    Federated Learning via Penalizing Gradient Norm", arXiv:2510.27504 (2025); rules as in the
    implementation spec (docs/algorithms.md §3).

    The server broadcasts the global direction c_t (the previous round's noisy global update per
    local step, c_0 = 0). In the ``mix`` form clients step along pgn-gamma*g + (1-pgn-gamma)*c_t
    and release only the private part R_i = (x_t - y_K) - (1-pgn-gamma)*K*lr_t*c_t, so clipping
    acts on the local-gradient part alone; in the ``perturb`` form they step along
    (1-alpha)*g(y) + alpha*g(y + r*c_t/|c_t|) and release R_i = x_t - y_K. The server adds the
    public part back to the privatised mean, D = R + (1-gamma)*K*lr_t*c_t (0 in ``perturb``),
    moves to x_{t+1} = x_t - smooth(D) and sets c_{t+1} = D / (K*lr_t) itself: clients never
    upload c.
    """

    paper = "Liu, Tian, Shang et al., arXiv:2510.27504"
    server_state = "x, c_t"
    released = "private part R of the update"

    @property
    def local_rule(self) -> str:  # type: ignore[override]
        """'pgn-mix' or 'pgn-perturb', from pgn-form."""
        return f"pgn-{self.config.pgn_form}"

    def public_part_scale(self, server_round: int) -> float:
        """(1 - gamma) * K * lr_t: how much of c_t the clients' own steps carried."""
        if self.config.pgn_form != "mix":
            return 0.0
        return (1 - self.config.pgn_gamma) * self.config.local_steps * self.learning_rate(
            server_round)

    def smooth(self, update: Tensors) -> Tensors:
        """Post-processing applied to D before the model update (identity here)."""
        return update

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """D = R + (1-gamma)K lr c_t; x_{t+1} = x_t - smooth(D); c_{t+1} = D / (K lr_t)."""
        scale = self.public_part_scale(server_round)
        direction = self.global_direction()
        full = {k: mean_update[k] + scale * direction[k] for k in self.parameter_names}
        step = self.smooth(full)
        self.remember_step(server_round, full)
        return {k: self.current[k] - step[k] for k in self.parameter_names}
