// MQTT.js as a real client of the broker, driven by tests/it/mqttjs.rs: connect, publish a
// burst of QoS 2 messages without waiting for any acknowledgement (as MQTT.js applications
// do), and print one line of JSON saying what happened.
//
//   node burst.js URL PROTOCOL_VERSION COUNT TOPIC_PREFIX
//   node burst.js mqtt://127.0.0.1:1883 4 50 burst/tcp
//   node burst.js ws://127.0.0.1:8083/mqtt 5 50 burst/ws
//
// Output: {"acked":N,"errors":[...],"disconnectReason":null|code,"closes":N,
//          "reconnects":N,"connack":{...}}
// "acked" counts publishes whose callback reported success (PUBCOMP received).
'use strict';

const mqtt = require('mqtt');

const [url, version, countArg, prefix] = process.argv.slice(2);
if (!url || !version || !countArg || !prefix) {
  console.error('usage: node burst.js URL PROTOCOL_VERSION COUNT TOPIC_PREFIX');
  process.exit(2);
}
const count = Number(countArg);
const result = {
  acked: 0,
  errors: [],
  disconnectReason: null,
  closes: 0,
  reconnects: 0,
  connack: null,
};

const client = mqtt.connect(url, {
  protocolVersion: Number(version),
  clientId: `mqttjs-${prefix.replace(/\W/g, '-')}`,
  clean: true,
  // No automatic reconnect: a disconnect must show, not be papered over by a resend.
  reconnectPeriod: 0,
  connectTimeout: 5000,
});

let done = false;
function finish() {
  if (done) return;
  done = true;
  console.log(JSON.stringify(result));
  client.end(true, () => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}

// However the broker answers, report within 15 s.
setTimeout(() => {
  result.errors.push('timed out');
  finish();
}, 15000).unref();

client.on('connect', (connack) => {
  result.connack = {
    sessionPresent: connack.sessionPresent,
    returnCode: connack.returnCode ?? connack.reasonCode ?? 0,
    receiveMaximum: connack.properties?.receiveMaximum ?? null,
  };
  let settled = 0;
  for (let i = 0; i < count; i++) {
    client.publish(`${prefix}/${i}`, String(i), { qos: 2 }, (err) => {
      if (err) {
        result.errors.push(String(err.message || err));
      } else {
        result.acked += 1;
      }
      settled += 1;
      if (settled === count) finish();
    });
  }
});
client.on('disconnect', (packet) => {
  result.disconnectReason = packet.reasonCode ?? 0;
});
client.on('reconnect', () => {
  result.reconnects += 1;
});
client.on('error', (err) => {
  result.errors.push(String(err.message || err));
});
client.on('close', () => {
  result.closes += 1;
  // Unacknowledged callbacks never fire without a reconnect: report what happened.
  if (result.acked < count) setTimeout(finish, 300);
});
