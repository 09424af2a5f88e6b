"""The WSGI entry point: ``gunicorn wsgi:app`` (and what ``flask`` finds here)."""

from pixstream import create_app

app = create_app()
