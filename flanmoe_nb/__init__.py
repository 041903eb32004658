"""Instruction-tuned sparse Mixture-of-Experts (FLAN-MoE) workspace: nbdev notebooks, a compiled MoE core, papermill experiments

Modules:

- `flanmoe_nb.kernels`: The compiled MoE core: custom ops from `flanmoe_nb._C` with autograd, fake (meta) kernels and pure-PyTorch reference twins."""

__version__ = "0.1.0"
