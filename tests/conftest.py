import os

# Tests run on the CPU with exact float32 matmuls, whatever machine they land on.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
