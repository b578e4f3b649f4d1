"""Triton kernels (attention forward, backward, forward+JVP and backward through the JVP).

Import :mod:`flowmap_kernels.triton_kernels.attention` for the launchers and
:mod:`flowmap_kernels.triton_kernels.configs` for the launch-config table.
"""
