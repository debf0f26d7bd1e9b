"""Client-level and record-level differential privacy, and the checks that hold it to account.

* ``mechanism``: the flat clip-then-noise mechanism and its placements (central, distributed,
  local), the screen of released norms, the accounting event it performs;
* ``noise``: the ChaCha20 Gaussian noise source (OS entropy; a test-only seed voids epsilon);
* ``sampling``: secret Poisson or fixed-size cohort sampling;
* ``accounting``: RDP/PLD accountants of the composed round events, and calibration;
* ``release``: names of what clients release beside the model update;
* ``record_dp``: record-level DP-SGD inside a silo, with the silo's own locked ledger;
* ``silo_policy``: what a silo's node config allows and promises (torch-free);
* ``audit`` (``make audit``) and ``canaries`` (the in-run audit): lower bounds on epsilon from
  canary clients, which must flag a deliberately broken mechanism.
"""
