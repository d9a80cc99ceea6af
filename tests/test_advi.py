"""What is special to ADVI (the generic contract runs in test_contract.py; its gradients against
autograd of the negative ELBO are checked in test_kernels.py)."""


from torch_proxvi import ADVI
from torch_proxvi.reference.testing import fit_linear_regression, linear_regression


def test_advi_recovers_the_optimal_mean_field_on_blr():
    # Same fixed point as ProxScore; seeds 0-1 measured 0.008 and 0.018 at this budget.
    problem = linear_regression()
    _, _, kl = fit_linear_regression(
        lambda params, n: ADVI(params, lr=1e-2, dataset_size=n, init_std=0.1), problem,
        batch_size=200, steps=12000, decay=500)
    assert kl <= 0.05, kl
