// MQTT.js in Node speaking MQTT 5.0 (protocolVersion: 5): a subscriber and
// a publisher on different shards (each client's shard read from the admin
// API), a QoS 1 publish with user properties, content type, response topic
// and correlation data, a subscription with a Subscription Identifier.
// Prints "subscribed", then "message TOPIC PAYLOAD PROPERTIES_JSON" once the
// subscriber has the message, and exits 0. Exits 1 on error or after 20 s.
// Usage: node v5_roundtrip.mjs MQTT_URL ADMIN_URL TOPIC
import mqtt from 'mqtt';

const [url, admin, topic] = process.argv.slice(2);
let done = false;
const fail = (why) => {
  if (done) return; // errors while closing after the message do not count
  console.log(`error ${why}`);
  process.exit(1);
};
setTimeout(() => fail('timeout'), 20000).unref();

const base = { protocolVersion: 5, clean: true, reconnectPeriod: 0, connectTimeout: 10000 };

// Connects `clientId`; resolves with the client and its CONNACK.
function connect(clientId, extra = {}) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(url, { ...base, clientId, ...extra });
    client.once('connect', (connack) => resolve({ client, connack }));
    client.once('error', reject);
  });
}

// The shard that holds `clientId`'s session, from the admin API.
async function shardOf(clientId) {
  const answer = await fetch(`${admin}/api/v1/clients/${encodeURIComponent(clientId)}`);
  if (!answer.ok) throw new Error(`admin API: ${answer.status}`);
  return (await answer.json()).shard;
}

async function main() {
  const tag = Math.random().toString(16).slice(2, 10);
  const { client: sub, connack } = await connect(`js5-sub-${tag}`, {
    properties: { receiveMaximum: 10, userProperties: { client: 'mqtt.js' } },
  });
  if (connack.reasonCode !== 0) fail(`CONNACK ${connack.reasonCode}`);
  const granted = await sub.subscribeAsync(topic, {
    qos: 1,
    rh: 0,
    properties: { subscriptionIdentifier: 5 },
  });
  if (granted[0].qos !== 1) fail(`SUBACK ${JSON.stringify(granted)}`);
  console.log('subscribed');
  const subShard = await shardOf(`js5-sub-${tag}`);
  let pub = null;
  for (let i = 0; i < 16 && pub === null; i++) {
    const id = `js5-pub-${tag}-${i}`;
    const { client } = await connect(id);
    if ((await shardOf(id)) !== subShard) {
      pub = client;
    } else {
      await client.endAsync();
    }
  }
  if (pub === null) fail(`16 publishers all on the subscriber's shard ${subShard}`);
  sub.on('message', (t, payload, packet) => {
    done = true;
    const p = packet.properties || {};
    const seen = {
      userProperties: p.userProperties,
      contentType: p.contentType,
      responseTopic: p.responseTopic,
      correlationData: p.correlationData && p.correlationData.toString(),
      subscriptionIdentifier: p.subscriptionIdentifier,
    };
    console.log(`message ${t} ${payload.toString()} ${JSON.stringify(seen)}`);
    Promise.all([sub.endAsync(), pub.endAsync()]).then(() => process.exit(0));
  });
  await pub.publishAsync(topic, 'hello v5', {
    qos: 1,
    properties: {
      userProperties: { k: 'v', n: ['1', '2'] },
      contentType: 'text/plain',
      responseTopic: `${topic}/reply`,
      correlationData: Buffer.from('c-1'),
    },
  });
}

main().catch((e) => fail(e.message));
