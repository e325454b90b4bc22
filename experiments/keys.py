"""API keys and TLS certificates for the prediction server (heistlab issue 7).

    python -m experiments.keys create --store keys.json --role probabilities --out client.json
    python -m experiments.keys create --store keys.json --role admin --out admin.json
    python -m experiments.keys revoke --store keys.json KEY_ID
    python -m experiments.keys list --store keys.json
    python -m experiments.keys selfsigned --out tls --host 127.0.0.1 --host localhost

The store keeps salted SHA-256 hashes of the keys' random 256-bit secrets only (``heistlab.serving.auth``
says why not scrypt); a key's secret is written once, to the client's key file (mode 0600). ``list`` names
keys kept under scrypt or PBKDF2 by older stores: still accepted, but verified at that cost and refused
unchecked while their failures are throttled; re-create them (``create``, then ``revoke`` the old id).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from heistlab.serving.auth import ROLES, create_key, read_store, revoke_key
from heistlab.serving.client import write_credentials
from heistlab.serving.tls import self_signed_pair


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="python -m experiments.keys", description=__doc__.split("\n")[0])
    sub = commands.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="add a key to a key store and write its client key file")
    create.add_argument("--store", required=True, help="the server's key store (created if absent)")
    create.add_argument("--role", required=True, choices=sorted(ROLES))
    create.add_argument("--out", required=True, help="the client's key file (mode 0600)")
    create.add_argument("--append", action="store_true", help="add to an existing key file (Sybil keys)")
    revoke = sub.add_parser("revoke", help="revoke a key (and every token issued for it)")
    revoke.add_argument("--store", required=True)
    revoke.add_argument("key_id")
    listing = sub.add_parser("list", help="list the keys of a store (no secrets)")
    listing.add_argument("--store", required=True)
    selfsigned = sub.add_parser("selfsigned", help="make a self-signed certificate and key for local HTTPS")
    selfsigned.add_argument("--out", required=True, help="folder for cert.pem and key.pem")
    selfsigned.add_argument("--host", action="append", help="a DNS name or IP address (repeatable)")
    selfsigned.add_argument("--days", type=int, default=30)
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    if arguments.command == "create":
        credential = create_key(arguments.store, arguments.role)
        write_credentials(arguments.out, [credential], append=arguments.append)
        print(f"created key {credential.key_id} ({arguments.role}); its secret is in {arguments.out}")
    elif arguments.command == "revoke":
        try:
            record = revoke_key(arguments.store, arguments.key_id)
        except KeyError as error:
            print(error.args[0], file=sys.stderr)
            return 1
        print(f"revoked key {record.key_id}")
    elif arguments.command == "list":
        for record in read_store(arguments.store).values():
            state = "revoked" if record.revoked is not None else "active"
            slow = f"  {record.kdf['name']}: re-create this key for the fast check" if record.slow else ""
            print(f"{record.key_id}  {record.role:<13}  {state}{slow}")
    else:
        pair = self_signed_pair(
            arguments.out, tuple(arguments.host or ("127.0.0.1", "localhost")), arguments.days
        )
        print(f"certificate {pair.certfile}, key {pair.keyfile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
