"""gunicorn settings for ``make run``: correct by default, several workers only with Redis.

The rate limiter's default ``memory://`` storage counts inside one process,
so the default is one worker process with threads. Set ``WEB_CONCURRENCY``
above 1 only together with ``FLASK_RATELIMIT_STORAGE_URI=redis://...``; one
worker per CPU is the measured choice there (bench/http_load.py, BENCHMARKS.md):

    WEB_CONCURRENCY=2 FLASK_RATELIMIT_STORAGE_URI=redis://127.0.0.1:6379 make run
"""

import os

wsgi_app = "secure_app.wsgi:app"
# Loopback only unless the operator says otherwise (a reverse proxy in front).
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
# Threads, measured with bench-style wrk runs (wrk -t1 -c16, 3 alternating rounds
# of 3 s, one worker, 2 CPUs, a busy host), requests/s on /second | /account-details:
#   1: 351 | 114    2: 768 | 193    4: 744 | 202    8: 1021 | 337    16: 1003 | 427
# One process holds the GIL, so past 8 threads only waiting requests gain
# (fsync, Argon2id and Pillow release the GIL). The bound is memory: each thread
# may hold one Argon2id hash (19 MiB); photo decodes do not run on these
# threads but on uploads.py's own pool of 2 (at most 2 more queued, the rest
# refused as busy), each at most ~104 MiB of added RSS and 0.5 s of CPU
# (bench/uploads.py), so photos add at most ~250 MiB per worker whatever
# the thread count.
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# The slowest legitimate request is a photo at its format's limit (~0.5 s of
# CPU); the gthread worker beats its heartbeat from its own loop, so 30 s only
# catches a wedged process.
timeout = 30
# Lets an in-flight upload or login finish on a restart.
graceful_timeout = 10
keepalive = 5
# Bound what one request may hold open (slowloris-style header floods).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
# Only the app's ProxyFix, with the operator's FLASK_PROXY_HOPS, may believe
# forwarded headers. gunicorn's own defaults trust X-Forwarded-Proto (and
# SCRIPT_NAME/PATH_INFO headers) from any client on 127.0.0.1, so anything on
# the host could make plain http look like https to the app: trust no one here.
forwarded_allow_ips = ""
secure_scheme_headers = {}
forwarder_headers = ""
accesslog = "-"
# gunicorn 27's control socket defaults to one shared path in $HOME: two
# servers on one machine (tests, benchmarks) would fight over it, and the
# site does not use it.
control_socket_disable = True
errorlog = "-"
# The app's audit lines go to stderr as JSON; keep gunicorn's own on the same stream.
capture_output = False


def on_starting(server):
    """Refuse a multi-process start that would silently weaken the login limits."""
    storage = os.environ.get("FLASK_RATELIMIT_STORAGE_URI", "memory://")
    limits_on = os.environ.get("FLASK_RATELIMIT_ENABLED", "true").lower() != "false"
    if server.cfg.workers > 1 and limits_on and storage.startswith("memory://"):
        raise SystemExit(
            "secure_app: several workers need a shared rate-limit storage; "
            "set FLASK_RATELIMIT_STORAGE_URI=redis://host:port or use one worker."
        )
