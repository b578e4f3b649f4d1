"""Triton kernels (attention forward, backward, forward+JVP and backward through the JVP).

:mod:`flowmap_kernels.attention.triton.kernels` holds the @triton.jit functions,
:mod:`flowmap_kernels.attention.triton.launch` the launch descriptions and the launchers, and
:mod:`flowmap_kernels.attention.triton.configs` the launch-config table.
"""
