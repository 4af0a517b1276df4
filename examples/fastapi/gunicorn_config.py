# The gunicorn configuration this app ran with before supervisor, as the write-up that started
# supervisor describes it ("Production Server Configuration": CPU x 2 + 1 workers, 120 s
# timeouts, worker recycling, production logging, settings from the environment on Render),
# started with `gunicorn -c gunicorn_config.py main:app`. `supervisor migrate -c
# gunicorn_config.py main:app` turns it into a supervisor.toml (see the README's "Coming from
# gunicorn"); tests/e2e/migrate.rs checks that the result serves.
import multiprocessing
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WORKERS", multiprocessing.cpu_count() * 2 + 1))
worker_class = "uvicorn.workers.UvicornWorker"
timeout = 120
graceful_timeout = 120
keepalive = 5
max_requests = 1000
max_requests_jitter = 50
loglevel = os.environ.get("LOG_LEVEL", "info")
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = "*"
preload_app = False


def worker_abort(worker):
    worker.log.warning("worker %s timed out", worker.pid)
