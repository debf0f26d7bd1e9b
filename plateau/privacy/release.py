"""Names of the vectors a client releases besides its model update.

Everything a client uploads is released, so extra vectors travel in the same ``update`` record
under a prefix and are clipped and noised together with the model update (one flat norm over all
of them): SCAFFOLD/FedGAMMA's control-variate change and FedSMOO's perturbation dual.
"""

CONTROL_PREFIX = "cv:"
DUAL_PREFIX = "mu:"
