"""CPU kernels (Numba) over host-resident pages, installed as `vortex_hybrid.cpu_kernels`."""
