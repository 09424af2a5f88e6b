"""gunicorn settings for pixstream: gevent workers holding thousands of long polls.

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os

# The Procfile convention: listen on $PORT, on every interface.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

worker_class = "gevent"
# Requests are I/O-bound; a couple of processes per core keep both cores busy.
workers = int(os.environ.get("WEB_CONCURRENCY", min(multiprocessing.cpu_count() * 2 + 1, 8)))
# A waiting long poll is one greenlet and no database connection.
worker_connections = int(os.environ.get("PIXSTREAM_WORKER_CONNECTIONS", 10000))

_long_poll = float(os.environ.get("PIXSTREAM_LONG_POLL_SECONDS", 8))
# Longer than any long poll, so that a waiting request is never taken for a hung worker.
timeout = int(_long_poll) + 30
graceful_timeout = int(_long_poll) + 5
keepalive = 75

# Never preload: each worker must open its own pool and listener after fork,
# and gevent must patch before psycopg is imported.
preload_app = False

accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms'
