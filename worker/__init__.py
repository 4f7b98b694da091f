"""Celery workers: a job id in, a trained model, metrics and checkpoints in the stores out."""
