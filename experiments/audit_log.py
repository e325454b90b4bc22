"""Checks a chained audit log of the prediction server against its head: deletions, reordering, truncation
and edits, each with the row ids.

    python -m experiments.audit_log verify --db audit.sqlite --mac-key-file audit-mac.key
    python -m experiments.audit_log verify --db audit.sqlite --head /elsewhere/audit.head --mac-key-env VAR
    python -m experiments.audit_log newkey > audit-mac.key      # a fresh 32-byte MAC key (hex)

Exit status: 0 intact, 1 damage found (one line per finding), 2 the log or key cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from heistlab.protection import ProtectionError, load_key, new_key
from heistlab.serving.audit import head_path_for, verify_log


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(
        prog="python -m experiments.audit_log", description=__doc__.split("\n")[0]
    )
    sub = commands.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify the chain and head of an audit log")
    verify.add_argument("--db", required=True, help="the audit database (serve.audit_db)")
    verify.add_argument("--head", help="the head file (serve.audit_head; default: <db>.head)")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--mac-key-file", help="the file holding the MAC key (serve.audit_mac_key_file)")
    source.add_argument("--mac-key-env", help="the variable holding the MAC key (serve.audit_mac_key_env)")
    sub.add_parser("newkey", help="print a fresh random MAC key (hex) to keep in a file of mode 0600")
    return commands


def verify(db: str, head: str | None, key_file: str | None, key_env: str | None) -> int:
    try:
        mac_key = load_key(key_file, key_env)
        report = verify_log(db, mac_key, head)
    except (ProtectionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = ", ".join(f"{count} {table}" for table, count in report.rows.items())
    print(f"{db} (head {head or head_path_for(db)}): {rows}")
    for finding in report.findings:
        print(f"FAIL {finding}")
    for note in report.notes:
        print(f"note {note}")
    print("intact" if report.intact else f"{len(report.findings)} finding(s): the log was tampered with")
    return 0 if report.intact else 1


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    if arguments.command == "newkey":
        print(new_key())
        return 0
    return verify(arguments.db, arguments.head, arguments.mac_key_file, arguments.mac_key_env)


if __name__ == "__main__":
    sys.exit(main())
