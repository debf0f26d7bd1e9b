"""The algorithms' run-config keys: (default, meaning, what is allowed) by key.

Made by `make docs` from each algorithm's ``Params`` groups (strategies/*), so that
the run config validates them without importing the algorithms: do not edit.
"""

KEYS = {
    'acg-lambda': (0.85, 'fedacg: momentum / look-ahead coefficient lambda.', {'min': 0, 'max': 1, 'max_exclusive': True}),
    'acg-beta': (0.01, 'fedacg: weight beta of the proximal term (beta/2)|y - z_t|^2.', {'min': 0}),
    'blur-alpha': (0.4, 'fedavg-blur: weight of the bounded-update regulariser (alpha/2)*max(0, |y - x|^2 - clip-norm^2).', {'min': 0}),
    'ls-sigma': (1.0, 'fedpgn-ls, fedavg-ls: Laplacian-smoothing strength lambda of (I - lambda*L)^-1; 0 = identity.', {'min': 0}),
    'server-momentum': (0.9, 'fedavgm: server momentum beta.', {'min': 0, 'max': 1, 'max_exclusive': True}),
    'server-lr': (1.0, 'fedavgm: server learning rate.', {'min': 0, 'min_exclusive': True}),
    'cm-alpha': (0.1, 'fedcm, mofedsam: weight of the local gradient; 1 - cm-alpha goes to the last global update.', {'min': 0, 'max': 1}),
    'dyn-alpha': (0.01, 'feddyn, fedsmoo: weight of the dynamic regulariser.', {'min': 0}),
    'sam-rho': (0.05, 'fedsam, mofedsam, fedlesam, fedgamma, fedsmoo: SAM radius.', {'min': 0}),
    'nsam-gamma': (0.85, 'FedNSAM: server momentum / Nesterov extrapolation coefficient.', {'min': 0, 'max': 1, 'max_exclusive': True}),
    'nsam-rho': (0.05, 'FedNSAM: SAM radius along the global momentum.', {'min': 0}),
    'nsam-form': ('paper', "FedNSAM client: 'paper' = gradient at y + gamma*m - rho*m/|m| (1 backprop); 'code' = local SAM from the look-ahead start x + gamma*m (2 backprops), as the authors' code, with correct momentum.", {'choices': ('paper', 'code')}),
    'pgn-gamma': (0.2, "DP-FedPGN: weight of the local gradient; 1 - pgn-gamma goes to the global direction c_t (authors' run: 0.2).", {'min': 0, 'max': 1}),
    'pgn-form': ('mix', "DP-FedPGN local direction: 'mix' = pgn-gamma*g + (1-pgn-gamma)*c_t (1 backprop); 'perturb' = (1-pgn-alpha)*g(y) + pgn-alpha*g(y + pgn-radius*c_t/|c_t|) (2 backprops).", {'choices': ('mix', 'perturb')}),
    'pgn-alpha': (0.5, "DP-FedPGN 'perturb' form: weight of the gradient at the perturbed point (penalty lambda / radius).", {'min': 0, 'max': 1}),
    'pgn-radius': (0.05, "DP-FedPGN 'perturb' form: finite-difference radius r along the global direction.", {'min': 0}),
    'smp-keep': (0.6, "fedsmp: fraction of coordinates kept by the round's public random mask.", {'min': 0, 'max': 1, 'min_exclusive': True}),
    'fedspeed-alpha': (1.0, 'fedspeed: weight of the gradient at the perturbed point in the merged gradient (1-alpha)*g(y) + alpha*g(y + rho*g/|g|); 1 = the FL-Simulator step.', {'min': 0, 'max': 1}),
    'fedspeed-rho': (0.05, 'fedspeed: perturbation radius of the merged gradient.', {'min': 0}),
    'fedspeed-lambda': (10.0, 'fedspeed: lambda of the prox-correction term (1/lambda)*(y - x_t + H_i).', {'min': 0, 'min_exclusive': True}),
    'wmsam-alpha': (0.1, 'FedWMSAM: weight of the local gradient (alpha_0 under the cosine schedule); 1 - alpha goes to the global direction.', {'min': 0, 'max': 1}),
    'wmsam-rho': (0.01, 'FedWMSAM: SAM radius towards the momentum-predicted global model.', {'min': 0}),
    'wmsam-schedule': ('cosine', "FedWMSAM: 'cosine' = alpha_{t+1} = 0.99*alpha_t + 0.01*clip(1 + cos(mean update, c_t), 0.1, 0.9), from the released mean; 'fixed' = alpha stays wmsam-alpha.", {'choices': ('cosine', 'fixed')}),
}
