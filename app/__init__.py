"""The service around the science: FastAPI control plane, registry, serving."""
