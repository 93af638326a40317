"""GPU kernels (Triton) over GPU-resident pages, installed as `vortex_hybrid.gpu_kernels`."""
