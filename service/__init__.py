"""odeforge service: FastAPI job API, job and artifact stores, inference, CLI."""
