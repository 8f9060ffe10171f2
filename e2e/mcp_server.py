"""The e2e tests' MCP server, on the official Python SDK (`mcp`), over
streamable HTTP: one tool the model has no way to answer without, a made-up
parcel tracker.

    python3 e2e/mcp_server.py PORT
"""
import asyncio
import sys

from mcp.server.mcpserver import MCPServer

PARCELS = {
    "SF1234567890": "Parcel SF1234567890: delivered on 2026-11-20 to the 翰林 front desk, signed by 王小明.",
}

server = MCPServer("parcels")


@server.tool(description="Look up where a parcel is, by its tracking number.")
def track_parcel(tracking_number: str) -> str:
    number = tracking_number.strip().upper()
    return PARCELS.get(number, f"No parcel has the tracking number {number}.")


if __name__ == "__main__":
    asyncio.run(server.run_streamable_http_async(host="127.0.0.1", port=int(sys.argv[1])))
