"""Command line of sec-online: ``sec-online SUBCOMMAND --help`` describes each subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from sec_online.logs import LOG_FORMATS, setup_logging
from sec_online.settings import LOG_LEVELS, Settings, SettingsError

logger = logging.getLogger("sec_online")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        settings, args.setting_sources = Settings.load(config_file=args.config)
        for name in ("log_level", "log_format"):
            if getattr(args, name) is not None:
                settings = dataclasses.replace(settings, **{name: getattr(args, name)})
                args.setting_sources[name] = "command line"
        setup_logging(settings.log_level, settings.log_format)
        return int(args.run(settings, args) or 0)
    except SettingsError as exc:
        print(f"sec-online: invalid settings: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _is_operational(exc):
            raise
        # Expected failures (no broker, bad data, a worker that died) get one line, not a
        # traceback; --log-level DEBUG shows the traceback too.
        logger.debug("command failed", exc_info=True)
        print(f"sec-online {args.command}: {exc}", file=sys.stderr)
        return 1


def _is_operational(exc: Exception) -> bool:
    from sec_online.broker import BrokerError
    from sec_online.data import DataError
    from sec_online.kafka_admin import KafkaAdminError
    from sec_online.replay import ReplayError
    from sec_online.workerproc import WorkerProcessError

    expected = (BrokerError, DataError, KafkaAdminError, ReplayError, WorkerProcessError)
    return isinstance(exc, expected + (FileNotFoundError,))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sec-online",
        description="Streaming Stratified Expert Cloning on Kafka. Settings come from defaults, "
        "an optional TOML file and SEC_* environment variables (these win); `sec-online config` "
        "prints them.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=LOG_LEVELS,
        help="lowest level printed (default: SEC_LOG_LEVEL, INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help="text lines or one JSON object per line (default: SEC_LOG_FORMAT, text)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML settings file, keys as in `sec-online config` (default: SEC_CONFIG_FILE)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_broker(commands)
    _add_topics(commands)
    _add_worker(commands)
    _add_replay(commands)
    _add_recommend(commands)
    _add_demo(commands)
    _add_evaluate(commands)
    _add_state(commands)
    _add_reliability(commands)
    _add_config(commands)
    return parser


def _add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config",
        help="print the effective settings as JSON (after the file and SEC_* variables)",
    )
    shape = config.add_mutually_exclusive_group()
    shape.add_argument(
        "--sources",
        action="store_true",
        help="print each value with where it came from: default, the file's path, or env",
    )
    shape.add_argument(
        "--markdown",
        action="store_true",
        help="print every setting's variable, type, unit, default and meaning as a table",
    )
    config.set_defaults(run=_run_config)


def _add_broker(commands: argparse._SubParsersAction) -> None:
    broker = commands.add_parser(
        "broker", help="manage the local Apache Kafka broker (KRaft) on 127.0.0.1"
    )
    broker.add_argument(
        "action",
        choices=["start", "stop", "status"],
        help="start: fetch the jars on first use, format the storage once, start and wait until "
        "it serves requests; stop: SIGTERM, then SIGKILL after --timeout; status: print state",
    )
    broker.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for start or stop"
    )
    broker.set_defaults(run=_run_broker)


def _add_topics(commands: argparse._SubParsersAction) -> None:
    topics = commands.add_parser("topics", help="create the topics the worker uses")
    topics.set_defaults(run=_run_topics)


def _add_worker(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "worker",
        help="start a worker; workers with the same SEC_APP_ID share the partitions as one "
        "consumer group",
    )
    worker.add_argument(
        "--web-port", type=int, default=None, help="HTTP port (default: SEC_WEB_PORT)"
    )
    worker.set_defaults(run=_run_worker)


def _add_replay(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser(
        "replay", help="publish a KuaiRand log to the impressions and returns topics"
    )
    replay.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="log_standard_*.csv[.gz] files (default: every log in SEC_DATA_DIR)",
    )
    replay.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="replay speed as a multiple of real time; 0 (default) publishes as fast as possible",
    )
    replay.add_argument("--start-ms", type=int, default=None, help="first request time, Unix ms")
    replay.add_argument(
        "--end-ms", type=int, default=None, help="end of the range, Unix ms (exclusive)"
    )
    replay.add_argument("--limit", type=int, default=None, help="publish at most N impressions")
    replay.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    replay.set_defaults(run=_run_replay)


def _add_recommend(commands: argparse._SubParsersAction) -> None:
    recommend = commands.add_parser(
        "recommend", help="ask a running worker for a user's recommendation"
    )
    recommend.add_argument("user_id", type=int)
    recommend.add_argument("--top", type=int, default=5, help="number of clusters to return")
    recommend.add_argument(
        "--url", default=None, help="worker base URL (default: http://127.0.0.1:SEC_WEB_PORT)"
    )
    recommend.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout, seconds")
    recommend.set_defaults(run=_run_recommend)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the main job: broker, topics, worker, replay of the log, summary and plot",
    )
    demo.add_argument("--limit", type=int, default=None, help="replay at most N impressions")
    demo.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the worker to process every event",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the worker and the managed broker running afterwards",
    )
    demo.set_defaults(run=_run_demo)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="offline evaluation: replay the recorded topics into a simulator fitted to the log "
        "and compare SEC with baselines (writes reports/eval/)",
    )
    evaluate.add_argument(
        "--seeds", type=int, default=5, help="number of seeds, 0 .. N-1 (default 5)"
    )
    evaluate.add_argument(
        "--split-day",
        type=int,
        default=7,
        help="first evaluation day, counted from 0 at the log's first day (UTC+8)",
    )
    evaluate.add_argument(
        "--users", type=int, default=1000, help="simulated test users per rollout"
    )
    evaluate.add_argument("--horizon-days", type=int, default=10, help="simulated days per rollout")
    evaluate.add_argument(
        "--slate-size",
        type=int,
        default=1,
        help="videos shown per simulated request (the log shows about 1; KuaiSim uses 6)",
    )
    evaluate.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: all); see sec_online/evaluation/run.py",
    )
    evaluate.add_argument(
        "--start-ms", type=int, default=None, help="first request time read, Unix ms"
    )
    evaluate.add_argument(
        "--end-ms", type=int, default=None, help="end of the time range read, Unix ms (exclusive)"
    )
    evaluate.set_defaults(run=_run_evaluate)


def _add_state(commands: argparse._SubParsersAction) -> None:
    state = commands.add_parser(
        "state", help="read the users table from its changelog topic (works while workers run)"
    )
    actions = state.add_subparsers(dest="state_action", required=True)
    dump = actions.add_parser(
        "dump",
        help="write every user's state as JSON lines, ordered by user id, each with the newest "
        "policy_version",
    )
    dump.add_argument(
        "--output", type=Path, default=None, help="file to write (default: standard output)"
    )
    dump.add_argument(
        "--timeout", type=float, default=120.0, help="seconds allowed to read each topic"
    )
    dump.set_defaults(run=_run_state_dump)


def _run_state_dump(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.kafka_admin import wait_for_broker
    from sec_online.statedump import StateDumpError, dump_states, newest_policy_version, write_dump

    wait_for_broker(settings.bootstrap, timeout_s=30.0)
    try:
        states = dump_states(settings, timeout_s=args.timeout)
    except StateDumpError as exc:
        print(f"sec-online state dump: {exc}", file=sys.stderr)
        return 1
    version = newest_policy_version(settings, timeout_s=args.timeout)
    lines = write_dump(states, version, args.output)
    if args.output is not None:
        print(f"wrote {lines} user states (policy version {version}) to {args.output}")
    return 0


def _add_reliability(commands: argparse._SubParsersAction) -> None:
    reliability = commands.add_parser(
        "reliability",
        help="run fault scenarios (worker killed, stopped, table deleted, rebalance, broker "
        "restart, trainer killed, duplicate and invalid records) on a slice of the log and "
        "check that no event is lost or applied twice; writes reports/reliability/summary.json",
    )
    reliability.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated scenarios (default: all, that is sigkill, sigterm, "
        "duplicates_and_garbage, rocksdb_deleted, rebalance, broker_restart, bad_input_mix and "
        "trainer_killed)",
    )
    reliability.add_argument("--users", type=int, default=30, help="users in the log slice")
    reliability.add_argument("--seed", type=int, default=0, help="seed of the fault points")
    reliability.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds each scenario may take to consume every record",
    )
    reliability.set_defaults(run=_run_reliability)


def _run_reliability(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.reliability import (
        SCENARIOS,
        ReliabilityConfig,
        ReliabilityError,
        run_reliability,
    )
    from sec_online.runtime import ensure_broker

    names = args.scenarios.split(",") if args.scenarios else SCENARIOS
    try:
        config = ReliabilityConfig(
            scenarios=tuple(name for name in names if name),
            users=args.users,
            seed=args.seed,
            timeout_s=args.timeout,
        )
    except ValueError as exc:
        print(f"sec-online reliability: {exc}", file=sys.stderr)
        return 2
    settings.require_data_dir()
    broker = ensure_broker(settings)
    try:
        summary = run_reliability(settings, config)
    except ReliabilityError as exc:
        print(f"sec-online reliability: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.stop()
    headline = {
        name: {key: result[key] for key in _RELIABILITY_HEADLINE}
        for name, result in summary["scenarios"].items()
    }
    print(json.dumps({"scenarios": headline, "summary_file": summary["summary_file"]}, indent=2))
    failed = [name for name, result in summary["scenarios"].items() if not result["passed"]]
    return 1 if failed else 0


_RELIABILITY_HEADLINE = (
    "published",
    "applied",
    "lost",
    "applied_twice",
    "dead_lettered",
    "recovery_seconds",
    "passed",
)


def _run_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.evaluation.run import DEFAULT_METHODS, EvalConfig, evaluate

    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    config = EvalConfig(
        seeds=tuple(range(args.seeds)),
        split_day=args.split_day,
        users=args.users,
        horizon_days=args.horizon_days,
        slate_size=args.slate_size,
        methods=methods,
        start_ms=args.start_ms,
        end_ms=args.end_ms,
    )
    result = evaluate(settings, config)
    rows = {
        method: row.get("return_time", {}).get("mean") for method, row in result["methods"].items()
    }
    print(json.dumps({"return_time_mean": rows, "wall_seconds": result["wall_seconds"]}, indent=2))
    return 0


def _run_config(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.settings import describe_markdown

    if args.markdown:
        print(describe_markdown(), end="")
        return 0
    values = settings.public_dict()
    if args.sources:
        values = {
            name: {"value": value, "source": args.setting_sources[name]}
            for name, value in values.items()
        }
    print(json.dumps(values, indent=2))
    return 0


def _run_broker(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.broker import ManagedBroker

    if not settings.managed_broker:
        print(
            f"sec-online: SEC_BOOTSTRAP_SERVERS={settings.bootstrap_servers} names an external "
            "cluster; unset it to manage the local broker",
            file=sys.stderr,
        )
        return 2
    broker = ManagedBroker(settings)
    if args.action == "start":
        status = broker.start(timeout_s=args.timeout)
    elif args.action == "stop":
        broker.stop(timeout_s=args.timeout)
        status = broker.status()
    else:
        status = broker.status()
    print(json.dumps(_plain(status), indent=2, default=str))
    return 0


def _run_topics(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.kafka_admin import wait_for_broker
    from sec_online.runtime import create_topics

    wait_for_broker(settings.bootstrap, timeout_s=30.0)
    for name in create_topics(settings):
        print(name)
    return 0


def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.runtime import run_worker

    return run_worker(settings, web_port=args.web_port)


def _run_replay(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.kafka_admin import wait_for_broker
    from sec_online.replay import replay
    from sec_online.runtime import create_topics

    missing = [str(path) for path in args.paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"log file not found: {', '.join(missing)}")
    if not args.paths:
        settings.require_data_dir()
    wait_for_broker(settings.bootstrap, timeout_s=30.0)
    create_topics(settings)
    report = replay(
        settings,
        args.paths or None,
        speed=args.speed or None,
        start_ms=args.start_ms,
        end_ms=args.end_ms,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(json.dumps(_plain(report), indent=2, default=str))
    return 0


def _run_recommend(settings: Settings, args: argparse.Namespace) -> int:
    base = args.url or f"http://127.0.0.1:{settings.web_port}"
    url = f"{base.rstrip('/')}/recommend/{args.user_id}/?top={args.top}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"sec-online: worker at {base} returned HTTP {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        print(
            f"sec-online: no worker reachable at {base} ({exc}); start one with "
            "`sec-online worker` or pass --url",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(body, indent=2))
    return 0


def _run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from sec_online.demo import run_demo

    summary = run_demo(
        settings, limit=args.limit, timeout_s=args.timeout, keep_running=args.keep_running
    )
    print(json.dumps({key: summary[key] for key in _DEMO_HEADLINE if key in summary}, indent=2))
    return 0


_DEMO_HEADLINE = (
    "impressions_in_log",
    "impressions_consumed",
    "returns_published",
    "users",
    "samples",
    "training_steps",
    "loss_first",
    "loss_last",
    "policy_versions_published",
    "dead_letters",
    "wall_seconds",
    "events_per_second",
    "summary_file",
    "plot_file",
)


def _plain(value: object) -> object:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: _plain(item) for key, item in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
