"""An independent Modbus TCP client (pymodbus) for tests/it/modbus_server.rs.

Usage: modbus_client.py HOST PORT OPS_JSON

OPS_JSON is a list of operations, each one of
  {"op": "read_holding" | "read_input" | "read_coils" | "read_discrete",
   "address": A, "count": N, "unit": U}
  {"op": "write_register", "address": A, "value": V, "unit": U}
  {"op": "write_registers", "address": A, "values": [V, ...], "unit": U}
  {"op": "write_coil", "address": A, "value": true, "unit": U}
Prints one JSON list with a result per operation: {"registers": [...]}, {"bits": [...]},
{"ok": true}, {"exception": CODE} or {"error": "..."} (no answer, a broken frame).
"""

import json
import sys

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException


def run(client, op):
    unit = op.get("unit", 1)
    kind = op["op"]
    if kind == "read_holding":
        response = client.read_holding_registers(op["address"], count=op["count"], device_id=unit)
    elif kind == "read_input":
        response = client.read_input_registers(op["address"], count=op["count"], device_id=unit)
    elif kind == "read_coils":
        response = client.read_coils(op["address"], count=op["count"], device_id=unit)
    elif kind == "read_discrete":
        response = client.read_discrete_inputs(op["address"], count=op["count"], device_id=unit)
    elif kind == "write_register":
        response = client.write_register(op["address"], op["value"], device_id=unit)
    elif kind == "write_registers":
        response = client.write_registers(op["address"], op["values"], device_id=unit)
    elif kind == "write_coil":
        response = client.write_coil(op["address"], op["value"], device_id=unit)
    else:
        return {"error": f"unknown op {kind}"}
    if response.isError():
        return {"exception": getattr(response, "exception_code", -1)}
    if kind.startswith("read_coils") or kind == "read_discrete":
        return {"bits": [bool(b) for b in response.bits[: op["count"]]]}
    if kind.startswith("read_"):
        return {"registers": list(response.registers)}
    return {"ok": True}


def main():
    host, port, ops = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    client = ModbusTcpClient(host, port=port, timeout=5, retries=0)
    if not client.connect():
        print(json.dumps([{"error": "cannot connect"}] * len(ops)))
        return 1
    results = []
    for op in ops:
        try:
            results.append(run(client, op))
        except ModbusException as error:
            results.append({"error": str(error)})
    client.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
