"""gradq's GEMM kernels. Each file holds one kernel family, its launcher and its CPU path."""
