"""The server's command line: its flags, its start-up (the descriptor limit raised to fit,
the listener opened, logging set up) and its one line on stdout. The loop is chatroom.server.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import resource
import secrets
import socket
import ssl
import sys
import time
from dataclasses import fields
from typing import Callable

from chatroom import bridge, cli, protocol, tls
from chatroom.limits import Limits
from chatroom.room import HISTORY_LINES, REMOTE_CAPACITY
from chatroom.server import DEFAULT_LIMITS, FD_RESERVE, ChatServer, WebCodecFactory

log = logging.getLogger("chatroom.server")

PROG = "chatroom-server"

# Redis' default backlog: a join storm waits in the kernel instead of being refused.
LISTEN_BACKLOG = 511

# When setrlimit refuses the open-files limit wanted, try this many fewer, and again (Redis).
OPEN_FILES_STEP = 16

# How often the status line is logged unprompted. Redis logs its client count every 5 s, but at
# its verbose level; once a minute keeps an info log readable (1,440 lines a day) however many
# members come and go, each of whom is logged only at debug.
STATUS_SECONDS = 60.0

# The room every server shares when --room is not given.
DEFAULT_ROOM = "chatroom"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def raise_open_files_limit(wanted: int) -> int:
    """Raises this process' soft open-files limit towards wanted, as far as the hard limit
    allows, stepping down while setrlimit refuses (Redis' adjustOpenFilesLimit); never lowers
    it. Gives the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    best = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    while best > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (best, hard))
        except (ValueError, OSError):  # above the kernel's nr_open, or a container's cap
            best -= OPEN_FILES_STEP
        else:
            return best
    return soft


def describe_limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def open_listener(host: str, port: int) -> socket.socket:
    """A listening socket; IPv6 when the host is an IPv6 address ("::" also takes IPv4)."""
    if ":" in host:
        return socket.create_server(
            (host, port),
            family=socket.AF_INET6,
            backlog=LISTEN_BACKLOG,
            dualstack_ipv6=host == "::",
        )
    return socket.create_server((host, port), backlog=LISTEN_BACKLOG)


_ORIGIN = re.compile(r"https?://[^/\s]+")

_BYTES = cli.int_in_range(1, 1 << 40)
_SECONDS = cli.float_in_range(0.01, 1e9)
_COUNT = cli.int_in_range(1, 1 << 30)

# Each limit's flag: its type, metavar and help; the flag's name is the Limits field's.
LIMIT_FLAGS: list[tuple[str, Callable[[str], object], str, str]] = [
    ("--max-line", cli.int_in_range(64, 1 << 20), "BYTES",
     "longest line a client may send, counting its newline"),
    ("--sendq-soft", _BYTES, "BYTES",
     "a member whose output queue stays over this for --sendq-soft-seconds is dropped"),
    ("--sendq-soft-seconds", _SECONDS, "SECONDS", "how long a queue may stay over --sendq-soft"),
    ("--sendq-hard", _BYTES, "BYTES", "a member whose output queue passes this is dropped"),
    ("--send-buffer", cli.int_in_range(4096, 1 << 26), "BYTES",
     "the kernel's send buffer for each member (SO_SNDBUF), on top of its output queue"),
    ("--sendq-total", _BYTES, "BYTES",
     "all output queues together; past it the largest is dropped first"),
    ("--write-timeout", _SECONDS, "SECONDS",
     "a member whose queued output has not moved for this long is dropped"),
    ("--flood-rate", cli.float_in_range(0, 1e9), "LINES_PER_S",
     "lines a second each connection may send after its burst; 0 turns flood control off"),
    ("--flood-burst", _COUNT, "LINES", "lines a connection may send at once"),
    ("--max-members", _COUNT, "N",
     "most connections at once; the open-files limit is raised to fit, as far as the hard "
     "limit allows, and past that the cap is lowered"),
    ("--max-unjoined", _COUNT, "N",
     "connections still to join, on top of the members; past it the longest waiting is cut"),
    ("--max-per-ip", cli.int_in_range(0, 1 << 30), "N",
     "most connections from one address (all of loopback is one); 0 for no cap"),
    ("--ipv6-prefix", cli.int_in_range(1, 128), "BITS",
     "IPv6 addresses are counted against --max-per-ip by network of this prefix length"),
    ("--join-timeout", _SECONDS, "SECONDS", "a connection must send !Join within this"),
    ("--line-timeout", _SECONDS, "SECONDS", "a line must end within this of its first byte"),
    ("--web-ping-interval", _SECONDS, "SECONDS",
     "a WebSocket member is pinged after this long without a ping"),
    ("--web-ping-timeout", _SECONDS, "SECONDS",
     "a WebSocket member that does not answer a ping within this is dropped"),
]  # fmt: skip


def web_origin(text: str) -> str:
    """An Origin as a browser sends it, scheme://host[:port]: lowercase, no path (a trailing
    slash, as people type it, is dropped)."""
    origin = text.strip().lower().rstrip("/")
    if not _ORIGIN.fullmatch(origin):
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin like https://chat.example")
    return origin


def web_codec_factory(origins: tuple[str, ...], max_line: int) -> WebCodecFactory | None:
    """The web codec with its settings, or None (and one log line) without the web extra."""
    try:
        from chatroom import web
    except ImportError as exc:
        log.warning(
            "no browser page: %s; an HTTP request is told to python -m pip install 'chatroom[web]'",
            exc,
        )
        return None
    settings = web.load_settings(origins, max_line, web.machine_names())
    return functools.partial(web.WebCodec, settings)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(PROG, "Serve a chat room for terminal clients and nc.")
    cli.add_address_arguments(
        parser,
        "address to listen on; 0.0.0.0 (or ::) for the whole LAN",
        0,
        "TCP port; 0 picks a free one",
    )
    parser.add_argument(
        "--history",
        type=cli.int_in_range(0, 1000),
        default=HISTORY_LINES,
        metavar="N",
        help="past chat lines shown to a newcomer, 0 for none (default: %(default)s)",
    )
    private = parser.add_argument_group("a private room (see README.md)")
    private.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (chain): a connection that opens with a TLS handshake is "
        "served over TLS, on the same port as plain ones",
    )
    private.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    private.add_argument(
        "--require-tls",
        action="store_true",
        help="refuse plain connections: one ERROR line, then close",
    )
    cli.add_password_file_argument(
        private, "the room's password, on the file's first line; clients send !Pass before !Join"
    )
    limits = parser.add_argument_group("limits (see README.md for the reasons)")
    for flag, kind, metavar, text in LIMIT_FLAGS:
        default = getattr(DEFAULT_LIMITS, flag[2:].replace("-", "_"))
        limits.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})"
        )
    limits.add_argument(
        "--exempt-loopback",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_LIMITS.exempt_loopback,
        help="leave connections from this machine out of --max-per-ip (default: exempt)",
    )
    shared = parser.add_argument_group("one room on several servers (see README.md)")
    shared.add_argument(
        "--redis",
        metavar="redis://HOST:PORT[/DB]",
        help="share the room with every server started with the same Redis and --room "
        "(needs: pip install 'chatroom[redis]')",
    )
    shared.add_argument(
        "--room",
        default=DEFAULT_ROOM,
        metavar="NAME",
        help="the shared room's name on that Redis (default: %(default)s)",
    )
    shared.add_argument(
        "--redis-heartbeat",
        type=cli.float_in_range(0.05, 60),
        default=bridge.HEARTBEAT_SECONDS,
        metavar="SECONDS",
        help="how often this server tells the others it is alive (default: %(default)g)",
    )
    shared.add_argument(
        "--redis-timeout",
        type=cli.float_in_range(0.1, 600),
        default=bridge.TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="a server not heard from for this long is gone and its members left; Redis not "
        "answering for this long splits the room (default: %(default)g)",
    )
    shared.add_argument(
        "--redis-max-message",
        type=cli.int_in_range(4096, 1 << 30),
        default=bridge.MAX_MESSAGE,
        metavar="BYTES",
        help="the longest message taken from Redis; a longer one is logged and dropped, and a "
        "reply that runs past it (and the history's size) closes the link (default: %(default)s)",
    )
    shared.add_argument(
        "--redis-max-members",
        type=cli.int_in_range(1, 10_000_000),
        default=REMOTE_CAPACITY,
        metavar="N",
        help="the most members of other servers the room holds; joins past it are logged and "
        "left out (default: %(default)s)",
    )
    shared.add_argument(
        "--redis-queue",
        type=cli.int_in_range(4096, 1 << 30),
        default=bridge.QUEUE_BYTES,
        metavar="BYTES",
        help="the queue of lines to Redis; past it lines for other servers are dropped "
        "(default: %(default)s)",
    )
    web = parser.add_argument_group("the browser page (see README.md)")
    web.add_argument(
        "--web-origin",
        action="append",
        type=web_origin,
        default=[],
        metavar="ORIGIN",
        help="a page at this origin (scheme://host[:port]) may open the room's WebSocket too, "
        "and its host name may be the Host of a request; repeatable. The room's own page "
        "always may (under an IP, localhost or this machine's name), and no other "
        "(default: none)",
    )
    logs = parser.add_argument_group("logging (on stderr)")
    logs.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        default="info",
        help="debug adds a line for every member who connects, joins, leaves, disconnects "
        "(default: %(default)s)",
    )
    logs.add_argument(
        "--summary-seconds",
        type=cli.float_in_range(0, 1e9),
        default=STATUS_SECONDS,
        metavar="SECONDS",
        help="log a status line (members, joins and leaves since the last one, bytes queued) "
        "this often, and on SIGUSR1; 0: only on SIGUSR1 (default: %(default)g)",
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.require_tls and args.tls_cert is None:
        parser.error("--require-tls needs --tls-cert and --tls-key")
    if not ROOM_NAME.match(args.room):
        parser.error("--room: 1 to 64 letters, digits, _, - or .")
    if args.redis is not None and args.redis_timeout <= args.redis_heartbeat:
        parser.error("--redis-timeout must be longer than --redis-heartbeat")
    if args.redis_max_message < bridge.most_say_bytes(args.max_line):
        least = bridge.most_say_bytes(args.max_line)
        parser.error(f"--redis-max-message must hold a whole line: at least {least} bytes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level],
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every handshake at info; the server's own lines say what matters.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, LOG_LEVELS[args.log_level]))
    limits = Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})
    tls_context = None
    if args.tls_cert is not None:
        try:
            tls_context = tls.server_context(args.tls_cert, args.tls_key)
            fingerprint = tls.certificate_fingerprint(args.tls_cert)
        except (OSError, ValueError) as exc:
            what = f"cannot use --tls-cert {args.tls_cert} and --tls-key {args.tls_key}"
            if isinstance(exc, ssl.SSLError):
                why = tls.describe_failure(exc)
            else:
                why = cli.describe(exc) if isinstance(exc, OSError) else str(exc)
            return cli.fail(PROG, f"{what}: {why}")
    if args.redis is not None:
        try:
            from chatroom import redis_link
        except ImportError as exc:
            why = f"--redis needs hiredis: pip install 'chatroom[redis]' ({exc})"
            return cli.fail(PROG, why)
        try:
            address = redis_link.parse_redis_url(args.redis)
        except ValueError as exc:
            return cli.fail(PROG, f"--redis: {exc}")
    try:
        listener = open_listener(args.host, args.port)
    except OSError as exc:
        where = protocol.format_member_id(args.host, args.port)
        return cli.fail(PROG, f"cannot listen on {where}: {cli.describe(exc)}")
    web_codec = web_codec_factory(tuple(args.web_origin), limits.max_line)
    open_files = raise_open_files_limit(limits.max_members + limits.max_unjoined + FD_RESERVE)
    # A new id at every start: a server that comes back is a new server to the others, whose
    # old members they have already seen leave.
    server_id = None if args.redis is None else secrets.token_hex(4)
    server = ChatServer(
        listener,
        limits,
        history_lines=args.history,
        tls_context=tls_context,
        require_tls=args.require_tls,
        password=args.password,
        web=web_codec,
        server_id=server_id,
        remote_members=args.redis_max_members,
    )
    if server_id is not None:
        the_bridge = bridge.Bridge(
            server_id,
            limits.max_line,
            args.redis_timeout,
            args.redis_max_message,
            args.redis_heartbeat,
        )
        link = redis_link.RedisLink(
            address,
            args.room,
            the_bridge,
            server.selector,
            time.monotonic,
            time.time,
            server.apply_from_link,
            server.roster,
            timeout=args.redis_timeout,
            queue_limit=args.redis_queue,
            history_lines=args.history,
            reply_limit=args.redis_max_message
            + args.history * bridge.most_say_bytes(limits.max_line),
            record_limit=args.redis_max_message,
        )
        server.attach_link(link)
        link.start()
    if tls_context is not None:
        plain = "refused" if args.require_tls else "served too"
        log.info("TLS on; plain connections %s. Certificate SHA-256 %s", plain, fingerprint)
    if args.password is not None and not args.require_tls:
        log.warning(
            "a room password without --require-tls: a plain connection sends it in clear text"
        )
    if server.max_members < limits.max_members:
        log.warning(
            "at most %d members, not %d: %d open files allowed (ulimit -n; hard limit %s), "
            "%d of them kept for the server",
            server.max_members,
            limits.max_members,
            open_files,
            describe_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
            FD_RESERVE,
        )
    server.log_status_every(args.summary_seconds)
    server.install_signal_handlers()
    host, port = listener.getsockname()[:2]
    print(f"listening on {protocol.format_member_id(host, port)}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
