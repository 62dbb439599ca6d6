// MQTT.js in Node: subscribes over WebSocket (ws:// or wss://), prints
// "subscribed" once the SUBACK arrived, then "message TOPIC PAYLOAD" for the
// first message and exits 0. Exits 1 on error or after 20 s.
// Usage: node ws_sub.mjs URL TOPIC [CA_PEM_FILE]
import { readFileSync } from 'node:fs';
import mqtt from 'mqtt';

const [url, topic, cafile] = process.argv.slice(2);
const options = { protocolVersion: 4, clean: true, reconnectPeriod: 0, connectTimeout: 10000 };
if (cafile) {
  options.ca = readFileSync(cafile);
  options.rejectUnauthorized = true;
}
let received = false;
const fail = (why) => {
  if (received) return; // errors while closing after the message do not count
  console.log(`error ${why}`);
  process.exit(1);
};
setTimeout(() => fail('timeout'), 20000).unref();
const client = mqtt.connect(url, options);
client.on('error', (e) => fail(e.message));
client.on('connect', () => {
  client.subscribe(topic, { qos: 1 }, (err, granted) => {
    if (err || granted[0].qos !== 1) fail(`subscribe ${err} ${JSON.stringify(granted)}`);
    console.log('subscribed');
  });
});
client.on('message', (t, payload) => {
  received = true;
  console.log(`message ${t} ${payload.toString()}`);
  client.end(false, () => process.exit(0));
});
