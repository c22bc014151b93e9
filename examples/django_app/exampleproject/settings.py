"""Settings of the foreman Django example: a notes app whose tasks run in a foreman pool.

The database is PostgreSQL when PGDATABASE is set (psycopg reads PGHOST, PGPORT, PGUSER and
PGPASSWORD itself), else SQLite beside this project.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "foreman_django",  # the outbox behind enqueue_on_commit
    "notes",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"

if os.environ.get("PGDATABASE"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ["PGDATABASE"],
            # Persistent connections, checked before their first use in each request or task: a
            # restarted database then costs neither a request nor a task.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    }
else:
    DATABASES = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles")

# foreman: where the queue is. Left out here, so the FOREMAN_DB environment variable decides (the
# one `foreman` itself reads), else ./foreman.sqlite3. Nothing opens it before the first task:
# migrate, test and collectstatic work without it.
# FOREMAN_DB = "/var/lib/foreman/foreman.sqlite3"
# FOREMAN_TIMEOUT = 1.0   # seconds a request may wait for the queue's write lock

# Warnings of foreman_django (a task left in the outbox for the relay) go to stderr.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"foreman_django": {"handlers": ["stderr"], "level": "INFO"}},
}
