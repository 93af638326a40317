"""Priority-based CPU-GPU scheduler, cost model and GPU page cache manager, installed as
`vortex_hybrid.scheduler`."""
