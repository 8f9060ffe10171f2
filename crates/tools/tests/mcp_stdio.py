"""A stdio MCP server for the tests, on the standard library only: it
answers initialize, tools/list and tools/call; `order_status` looks up a
made-up order; `env` returns the names of the environment it was started
with; `garbage` makes it write a line that is not JSON-RPC and exit."""
import json
import os
import sys

ORDERS = {"8812": "Order 8812 was shipped on 2026-11-20 by SF Express, tracking number SF1234567890."}

TOOLS = [
    {"name": "order_status", "description": "Look up the shipping status of a customer's order by its number.",
     "inputSchema": {"type": "object", "properties": {"order_id": {"type": "string", "description": "The order number"}},
                     "required": ["order_id"]}},
    {"name": "env", "description": "The names of this process's environment variables.",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "garbage", "description": "Breaks the connection.",
     "inputSchema": {"type": "object", "properties": {}}},
]

for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method, rid = msg.get("method"), msg["id"]
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"],
                  "capabilities": {"tools": {}},
                  "serverInfo": {"name": "test-stdio", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and msg["params"]["name"] == "order_status":
        oid = str(msg["params"].get("arguments", {}).get("order_id", "")).strip().lstrip("#")
        text = ORDERS.get(oid, "There is no order %s." % oid)
        result = {"content": [{"type": "text", "text": text}]}
    elif method == "tools/call" and msg["params"]["name"] == "env":
        names = ",".join(sorted(os.environ)) or "(empty)"
        result = {"content": [{"type": "text", "text": names}]}
    elif method == "tools/call" and msg["params"]["name"] == "garbage":
        sys.stdout.write("%%% not json-rpc %%%\n")
        sys.stdout.flush()
        sys.exit(0)
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": rid,
                          "error": {"code": -32601, "message": "no such method"}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}), flush=True)
