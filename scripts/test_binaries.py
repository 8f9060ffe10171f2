#!/usr/bin/env python3
"""Reads `cargo test --no-run --message-format=json` on stdin and writes one
line per test executable: package, target name, executable, package directory
(tab-separated). scripts/test.sh runs these same binaries for its later
passes instead of calling `cargo test -p …`, which would resolve features for
the selected packages alone and rebuild much of the dependency tree."""
import json
import os
import sys

for line in sys.stdin:
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    package = msg["package_id"].split("#")[-1].split("@")[0]
    if "/" in package:  # old-style ids: "name version (source)"
        package = msg["package_id"].split(" ")[0]
    kind = msg["target"]["kind"][0]
    name = msg["target"]["name"] if kind == "test" else kind
    print(package, name, msg["executable"], os.path.dirname(msg["manifest_path"]), sep="\t")
