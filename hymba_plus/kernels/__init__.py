"""Kernels: a pure-PyTorch reference per op plus fast paths chosen by ``dispatch``."""
