"""Triton kernels (attention forward, backward, forward+JVP and backward through the JVP).

Import :mod:`flowmap_kernels.attention.triton.kernels` for the launchers and
:mod:`flowmap_kernels.attention.triton.configs` for the launch-config table.
"""
