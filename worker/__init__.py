"""Celery worker side: the app, tasks per job kind, the job runner. Never imports ``web``."""
