"""A closed-loop Modbus TCP load client (pymodbus) for `fieldmq-bench modbus-server`.

Usage: modbus_load.py HOST PORT REGISTERS WARMUP_S SECONDS

Reads REGISTERS holding registers from address 0 (FC03, unit 1) in a closed loop: the next
request goes out when the previous answer arrived. Answers during the first WARMUP_S seconds
are not recorded; the loop ends SECONDS later. Prints one JSON object:
{"latencies_us": [...], "errors": N}; an answer with the wrong length or an exception
counts as an error.
"""

import json
import sys
import time

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    registers, warmup, seconds = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    client = ModbusTcpClient(host, port=port, timeout=2, retries=0)
    if not client.connect():
        print(json.dumps({"latencies_us": [], "errors": 1, "reason": "cannot connect"}))
        return 1
    clock = time.perf_counter
    start = clock()
    measure_from, end = start + warmup, start + warmup + seconds
    latencies, errors = [], 0
    while True:
        sent = clock()
        if sent >= end:
            break
        try:
            answer = client.read_holding_registers(0, count=registers, device_id=1)
            good = not answer.isError() and len(answer.registers) == registers
        except ModbusException:
            good = False
        done = clock()
        if not good:
            errors += 1
        elif sent >= measure_from:
            latencies.append(int((done - sent) * 1_000_000))
    client.close()
    print(json.dumps({"latencies_us": latencies, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
