"""Optional integrations with other libraries.

Each submodule imports its library only when it is imported itself, so ``import torch_proxvi``
never needs them:

- :mod:`torch_proxvi.integrations.hf`: Hugging Face ``transformers`` (``Trainer`` callback and
  :func:`~torch_proxvi.integrations.hf.bayesian_predict`).
- :mod:`torch_proxvi.integrations.timm`: registers ``"proxvi"`` with timm's optimizer factory.
"""
