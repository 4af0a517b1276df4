# Run by `supervisor migrate` with the app's Python: reads a gunicorn configuration the way
# gunicorn does (the config file executed as Python, then GUNICORN_CMD_ARGS, then the command
# line, each later one winning) and prints it as JSON for supervisor to map. It never imports
# gunicorn, so it works where gunicorn is not installed. Input: argv[1:] is the gunicorn command
# line (without the program name). Output, on stdout: {"settings": {name: value},
# "source": {name: where}, "hooks": [names], "app": "module:app" or null, "python": path,
# "cpus": n, "config_file": path or null, "installed": {"uvicorn": bool, "gunicorn": bool}}. An error: one line on stderr, exit status 2.
import argparse
import importlib.util
import json
import os
import runpy
import shlex
import sys

# Every setting gunicorn reads (its names in a configuration file).
SETTINGS = {
    "config", "wsgi_app", "reload", "reload_engine", "reload_extra_files", "spew",
    "check_config", "print_config", "accesslog", "disable_redirect_access_to_syslog",
    "access_log_format", "errorlog", "loglevel", "capture_output", "logger_class", "logconfig",
    "logconfig_dict", "logconfig_json", "syslog_addr", "syslog", "syslog_prefix",
    "syslog_facility", "enable_stdio_inheritance", "statsd_host", "dogstatsd_tags",
    "statsd_prefix", "proc_name", "default_proc_name", "keyfile", "certfile", "ssl_version",
    "cert_reqs", "ca_certs", "suppress_ragged_eofs", "do_handshake_on_connect", "ciphers",
    "limit_request_line", "limit_request_fields", "limit_request_field_size", "preload_app",
    "sendfile", "reuse_port", "chdir", "daemon", "raw_env", "pidfile", "worker_tmp_dir", "user",
    "group", "umask", "initgroups", "tmp_upload_dir", "secure_scheme_headers",
    "forwarded_allow_ips", "pythonpath", "paste", "proxy_protocol", "proxy_allow_ips",
    "raw_paste_global_conf", "permit_obsolete_folding", "strip_header_spaces",
    "permit_unconventional_http_method", "permit_unconventional_http_version",
    "casefold_http_method", "forwarder_headers", "header_map", "bind", "backlog", "workers",
    "worker_class", "threads", "worker_connections", "max_requests", "max_requests_jitter",
    "timeout", "graceful_timeout", "keepalive",
}
HOOKS = {
    "on_starting", "on_reload", "when_ready", "pre_fork", "post_fork", "post_worker_init",
    "worker_int", "worker_abort", "pre_exec", "pre_request", "post_request", "child_exit",
    "worker_exit", "nworkers_changed", "on_exit", "ssl_context",
}


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def parser():
    p = argparse.ArgumentParser(prog="gunicorn", add_help=False, allow_abbrev=False)
    add = p.add_argument
    add("-c", "--config", dest="config")
    add("-b", "--bind", dest="bind", action="append")
    add("-w", "--workers", dest="workers", type=int)
    add("-k", "--worker-class", dest="worker_class")
    add("--threads", dest="threads", type=int)
    add("--worker-connections", dest="worker_connections", type=int)
    add("-t", "--timeout", dest="timeout", type=int)
    add("--graceful-timeout", dest="graceful_timeout", type=int)
    add("--keep-alive", dest="keepalive", type=int)
    add("--max-requests", dest="max_requests", type=int)
    add("--max-requests-jitter", dest="max_requests_jitter", type=int)
    add("--log-level", dest="loglevel")
    add("--access-logfile", dest="accesslog")
    add("--access-logformat", dest="access_log_format")
    add("--error-logfile", "--log-file", dest="errorlog")
    add("--log-config", dest="logconfig")
    add("--capture-output", dest="capture_output", action="store_const", const=True)
    add("--forwarded-allow-ips", dest="forwarded_allow_ips")
    add("--proxy-protocol", dest="proxy_protocol", action="store_const", const=True)
    add("--proxy-allow-from", dest="proxy_allow_ips")
    add("--preload", dest="preload_app", action="store_const", const=True)
    add("--chdir", dest="chdir")
    add("--pythonpath", dest="pythonpath")
    add("-u", "--user", dest="user")
    add("-g", "--group", dest="group")
    add("-m", "--umask", dest="umask")
    add("-p", "--pid", dest="pidfile")
    add("--backlog", dest="backlog", type=int)
    add("--limit-request-line", dest="limit_request_line", type=int)
    add("--limit-request-fields", dest="limit_request_fields", type=int)
    add("--limit-request-field_size", "--limit-request-field-size",
        dest="limit_request_field_size", type=int)
    add("--certfile", dest="certfile")
    add("--keyfile", dest="keyfile")
    add("--ca-certs", dest="ca_certs")
    add("--reload", dest="reload", action="store_const", const=True)
    add("-D", "--daemon", dest="daemon", action="store_const", const=True)
    add("-e", "--env", dest="raw_env", action="append")
    add("-n", "--name", dest="proc_name")
    add("--worker-tmp-dir", dest="worker_tmp_dir")
    add("--statsd-host", dest="statsd_host")
    add("--reuse-port", dest="reuse_port", action="store_const", const=True)
    add("app", nargs="?")
    return p


def flags(args, where):
    try:
        parsed, unknown = parser().parse_known_args(args)
    except SystemExit:
        fail(f"cannot read the gunicorn options in {where}: {shlex.join(args)}")
    out = {k: v for k, v in vars(parsed).items() if v is not None}
    return out, unknown


def plain(value):
    """A value as JSON can carry it; anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return repr(value)


def main():
    args = sys.argv[1:]
    command, unknown = flags(args, "the command line")
    env_args = shlex.split(os.environ.get("GUNICORN_CMD_ARGS", ""))
    from_env, unknown_env = flags(env_args, "GUNICORN_CMD_ARGS")
    if from_env.get("app"):
        fail("GUNICORN_CMD_ARGS names an app; gunicorn takes it from the command line only")
    path = command.get("config") or from_env.get("config")
    if path is None and os.path.exists("gunicorn.conf.py"):
        path = "gunicorn.conf.py"
    if path is not None and path.startswith("python:"):
        fail(f"-c {path}: a configuration module is not supported; pass its file's path")
    settings, source, hooks = {}, {}, []
    if path is not None:
        if not os.path.isfile(path):
            fail(f"gunicorn configuration {path} not found")
        # gunicorn runs the file with its directory importable.
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        try:
            scope = runpy.run_path(path)
        except BaseException as e:  # the user's code: report whatever it raised
            fail(f"{path}: running it failed: {type(e).__name__}: {e}")
        for name, value in scope.items():
            if name in HOOKS and callable(value):
                hooks.append(name)
            elif name in SETTINGS and not callable(value):
                settings[name] = plain(value)
                source[name] = path
    for layer, where in ((from_env, "GUNICORN_CMD_ARGS"), (command, "the command line")):
        for name, value in layer.items():
            if name in ("config", "app"):
                continue
            if name == "raw_env" and "raw_env" in settings:
                value = list(settings["raw_env"]) + value
            settings[name] = plain(value)
            source[name] = where
    app = command.get("app") or settings.pop("wsgi_app", None)
    source.pop("wsgi_app", None)
    print(json.dumps({
        "settings": settings, "source": source, "hooks": sorted(hooks), "app": app,
        "unknown_options": unknown + unknown_env, "python": sys.executable,
        "cpus": os.cpu_count() or 1, "config_file": path,
        "installed": {name: importlib.util.find_spec(name) is not None
                      for name in ("uvicorn", "gunicorn")},
    }))


main()
