"""Ask the lab's CA for a certificate, as a node agent would; print the outcome as JSON.

Run inside a node's namespace (the CA is reachable only from the lab's networks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from identity.ca_client import CertificateRequestFailed, request_certificate
from identity.spiffe import Identity


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca-url", required=True)
    parser.add_argument("--ca-root", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--identity", required=True)
    args = parser.parse_args()
    try:
        bundle = await request_certificate(
            ca_url=args.ca_url, ca_root_pem=open(args.ca_root, "rb").read(), token=args.token,
            identity=Identity.parse(args.identity))
    except CertificateRequestFailed as exc:
        print(json.dumps({"signed": False, "status": exc.status, "reason": str(exc)}))
        return 0
    print(json.dumps({"signed": True, "identity": bundle.identity.uri}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
