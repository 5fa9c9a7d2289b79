#!/usr/bin/env bash
# Run the Eclipse Paho MQTT interoperability suite against fieldmq or Mosquitto.
#
#   scripts/conformance.sh <paho.mqtt.testing checkout> [--fieldmq-bin PATH] [--mosquitto]
#                          [--suite v311|v5|all] [--tests NAME[,NAME...]] [--timeout SECS]
#                          [--out DIR] [--fieldmq-extra FILE] [--mosquitto-extra FILE]
#
# The suite (github.com/eclipse/paho.mqtt.testing, directory interoperability/) needs only
# Python 3. It is third-party code: keep the checkout outside this repository, never commit it.
#
# The broker is started here on a free 127.0.0.1 port and stopped on exit:
#   fieldmq    `fieldmq run -c <temp TOML>` (default binary: target/release/fieldmq)
#   mosquitto  `mosquitto -c <temp conf>` with an ACL denying `test/nosubscribe` (needed by
#              test_subscribe_failure) and `max_keepalive 60` (test_server_keep_alive expects
#              Server Keep Alive = 60)
# For fieldmq, extra TOML for the [broker] table (e.g. an ACL once the config has one) can be
# appended with --fieldmq-extra FILE.
#
# Every test runs in its own Python process (fresh suite setUpClass, per-test timeout), so a
# hang or a crash in one test cannot take the rest down. Logs and results.tsv go to --out
# (default: a new temp dir, printed at the end). Exit status: 0 if the run completed (whatever
# the pass count), 2 on usage error, 1 if the broker could not be started.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 1 ]] || usage
PAHO=$1; shift
TARGET=fieldmq
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIELDMQ_BIN=$REPO_ROOT/target/release/fieldmq
SUITE=all
TESTS=""
TIMEOUT=90
OUT=""
FIELDMQ_EXTRA=""
MOSQUITTO_EXTRA=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --fieldmq-bin) FIELDMQ_BIN=$2; shift 2 ;;
    --mosquitto) TARGET=mosquitto; shift ;;
    --suite) SUITE=$2; shift 2 ;;
    --tests) TESTS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --fieldmq-extra) FIELDMQ_EXTRA=$2; shift 2 ;;
    --mosquitto-extra) MOSQUITTO_EXTRA=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done

INTEROP=$PAHO/interoperability
[[ -f $INTEROP/client_test.py && -f $INTEROP/client_test5.py ]] || {
  echo "error: $PAHO does not look like a paho.mqtt.testing checkout (no interoperability/client_test.py)" >&2
  exit 2
}
case $SUITE in v311) SUITES=(client_test) ;; v5) SUITES=(client_test5) ;; all) SUITES=(client_test client_test5) ;;
  *) echo "error: --suite must be v311, v5 or all" >&2; exit 2 ;; esac
command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 2; }

WORK=$(mktemp -d -t fieldmq-conformance.XXXXXX)
[[ -n $OUT ]] || OUT=$WORK/out
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BROKER_PID=""
cleanup() {
  if [[ -n $BROKER_PID ]] && kill -0 "$BROKER_PID" 2>/dev/null; then
    kill "$BROKER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$BROKER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK/data" "$WORK/harness.py"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_ready() { # port pid: connect in a loop, bounded (10 s)
  local port=$1 pid=$2
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 1
    if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2).close()' "$port" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

PORT=$(free_port)
mkdir -p "$WORK/data"
if [[ $TARGET == mosquitto ]]; then
  command -v mosquitto >/dev/null || { echo "error: mosquitto not installed (apt-get install -y mosquitto)" >&2; exit 1; }
  cat >"$WORK/acl" <<'EOF'
topic deny test/nosubscribe
topic readwrite #
EOF
  cat >"$WORK/broker.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
max_keepalive 60
acl_file $WORK/acl
persistence false
# mosquitto started as root drops to user "mosquitto", which cannot read this temp dir
user $(id -un)
EOF
  [[ -z $MOSQUITTO_EXTRA ]] || cat "$MOSQUITTO_EXTRA" >>"$WORK/broker.conf"
  mosquitto -c "$WORK/broker.conf" >"$OUT/broker.log" 2>&1 &
  BROKER_PID=$!
  BROKER_DESC="mosquitto $( (mosquitto -h 2>/dev/null || true) | sed -n "1s/.*version //p")"
else
  [[ -x $FIELDMQ_BIN ]] || { echo "error: fieldmq binary $FIELDMQ_BIN not found (cargo build --release, or --fieldmq-bin)" >&2; exit 1; }
  {
    echo '[gateway]'
    echo 'id = "conformance"'
    echo "data_dir = \"$WORK/data\""
    echo '[broker]'
    echo 'allow_anonymous = true'
    [[ -z $FIELDMQ_EXTRA ]] || cat "$FIELDMQ_EXTRA"
    echo '[[broker.listeners]]'
    echo "bind = \"127.0.0.1:$PORT\""
  } >"$WORK/broker.toml"
  "$FIELDMQ_BIN" run -c "$WORK/broker.toml" >"$OUT/broker.log" 2>&1 &
  BROKER_PID=$!
  BROKER_DESC="fieldmq ($FIELDMQ_BIN)"
fi
if ! wait_ready "$PORT" "$BROKER_PID"; then
  echo "error: broker did not accept connections on 127.0.0.1:$PORT; log:" >&2
  tail -n 30 "$OUT/broker.log" >&2
  exit 1
fi
echo "broker: $BROKER_DESC on 127.0.0.1:$PORT (pid $BROKER_PID)"

# The suite's own __main__ blocks hand sys.argv to unittest.main(), which rejects
# --hostname/--port; this harness sets the module globals the __main__ blocks would set,
# runs the named tests and prints one parseable line per test.
cat >"$WORK/harness.py" <<'EOF'
import io, os, sys, time, traceback, unittest
mode, modname, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, os.getcwd())
m = __import__(modname)
m.host, m.port = host, port
m.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
m.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
m.nosubscribe_topics = ("test/nosubscribe",)
m.topic_prefix = "client_test5/"
names = unittest.TestLoader().getTestCaseNames(m.Test)
if mode == "list":
    print("\n".join(names))
    os._exit(0)
for name in sys.argv[5:]:
    result = unittest.TestResult()
    start = time.time()
    unittest.TestSuite([m.Test(name)]).run(result)
    status = "PASS"
    if result.errors:
        status = "ERROR"
    elif result.failures:
        status = "FAIL"
    elif result.skipped:
        status = "SKIP"
    elif result.testsRun == 0:
        status = "ERROR"
    for _, tb in result.errors + result.failures:
        sys.stderr.write(tb)
    print("PAHO-RESULT %s %s %s %.1f" % (modname, name, status, time.time() - start), flush=True)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # the suite's client threads are not daemons
EOF

RESULTS=$OUT/results.tsv
: >"$RESULTS"
cd "$INTEROP"
for suite in "${SUITES[@]}"; do
  mapfile -t names < <(python3 "$WORK/harness.py" list "$suite" 127.0.0.1 "$PORT")
  for name in "${names[@]}"; do
    if [[ -n $TESTS && ",$TESTS," != *",$name,"* ]]; then continue; fi
    log=$OUT/$suite.$name.log
    start=$(date +%s)
    line=$(timeout -k 5 "$TIMEOUT" python3 -u "$WORK/harness.py" run "$suite" 127.0.0.1 "$PORT" "$name" \
             2>"$log.err" | tee "$log" | grep '^PAHO-RESULT' || true)
    cat "$log.err" >>"$log"; rm -f "$log.err"
    if [[ -n $line ]]; then
      read -r _ _ _ status secs <<<"$line"
    else
      status=TIMEOUT; secs=$(( $(date +%s) - start ))
    fi
    printf '%s\t%s\t%s\t%s\n' "$suite" "$name" "$status" "$secs" >>"$RESULTS"
    printf '%-13s %-36s %-7s %6ss\n' "$suite" "$name" "$status" "$secs"
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
      echo "broker exited during $name; restarting is not attempted, remaining tests fail" >&2
    fi
  done
done

echo
echo "Summary ($BROKER_DESC):"
printf '%-13s %6s %6s %6s\n' suite pass fail total
for suite in "${SUITES[@]}"; do
  p=$(awk -F'\t' -v s="$suite" '$1==s && $3=="PASS"' "$RESULTS" | wc -l)
  t=$(awk -F'\t' -v s="$suite" '$1==s' "$RESULTS" | wc -l)
  printf '%-13s %6d %6d %6d\n' "$suite" "$p" $((t - p)) "$t"
done
echo "per-test logs, broker.log and results.tsv: $OUT"
