// MQTT.js idle subscribers for bench/ws-idle.sh: opens COUNT clients to URL
// (ws://, wss:// or mqtt://), at most 200 handshakes in flight, each
// subscribing to TOPIC once connected; prints "ready COUNT" when every
// SUBACK arrived, then holds the connections until stdin closes.
// With EXPECT, counts the messages all clients receive and prints
// "received EXPECT" once that many arrived (fan-out runs).
// Exits 1 on any error or after 120 s without all of them ready.
// Usage: node ws_idle.mjs URL COUNT TOPIC [EXPECT]
import mqtt from 'mqtt';

const [url, countArg, topic, expectArg] = process.argv.slice(2);
const count = Number(countArg);
const expect = Number(expectArg ?? 0);
let received = 0;
const inFlight = 200;
const options = {
  protocolVersion: 4, clean: true, reconnectPeriod: 0, connectTimeout: 30000,
  keepalive: 60, rejectUnauthorized: false,
};
const fail = (why) => { console.log(`error ${why}`); process.exit(1); };
const timer = setTimeout(() => fail('timeout'), 120000);
const clients = [];
let started = 0;
let ready = 0;
const next = () => {
  if (started >= count) return;
  started += 1;
  const client = mqtt.connect(url, { ...options, clientId: `idle-${process.pid}-${started}` });
  clients.push(client);
  client.on('message', () => {
    received += 1;
    if (received === expect) console.log(`received ${expect}`);
  });
  client.on('error', (e) => fail(e.message));
  client.on('connect', () => {
    client.subscribe(topic, { qos: 0 }, (err) => {
      if (err) fail(`subscribe ${err}`);
      ready += 1;
      if (ready === count) {
        clearTimeout(timer);
        console.log(`ready ${count}`);
      }
      next();
    });
  });
};
for (let i = 0; i < inFlight; i += 1) next();
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
