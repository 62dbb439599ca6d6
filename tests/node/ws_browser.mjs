// MQTT.js in headless Chromium: the page loads mqtt.min.js from
// node_modules (no CDN), subscribes over WebSocket, and reports back through
// an exposed function. Prints "subscribed", then "message TOPIC PAYLOAD"
// for the first message, and exits 0. Exits 1 on error or after 30 s.
// Usage: node ws_browser.mjs URL TOPIC
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [url, topic] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const profile = mkdtempSync(join(tmpdir(), 'fanmq-chromium-'));
let context;
const finish = async (code, line) => {
  console.log(line);
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  process.exit(code);
};
setTimeout(() => finish(1, 'error timeout'), 30000).unref();

try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const page = await context.newPage();
  let done;
  const received = new Promise((resolve) => { done = resolve; });
  await page.exposeFunction('report', (line) => {
    console.log(line);
    if (line.startsWith('message') || line.startsWith('error')) done(line);
  });
  await page.setContent('<!doctype html><title>fanmq</title>');
  await page.addScriptTag({ path: join(here, 'node_modules/mqtt/dist/mqtt.min.js') });
  await page.evaluate(({ url, topic }) => {
    const client = window.mqtt.connect(url, { protocolVersion: 4, reconnectPeriod: 0 });
    client.on('error', (e) => window.report(`error ${e.message}`));
    client.on('connect', () => {
      client.subscribe(topic, { qos: 1 }, (err) => {
        window.report(err ? `error subscribe ${err}` : 'subscribed');
      });
    });
    client.on('message', (t, payload) => {
      window.report(`message ${t} ${new TextDecoder().decode(payload)}`);
      client.end();
    });
  }, { url, topic });
  const line = await received;
  await finish(line.startsWith('message') ? 0 : 1, 'done');
} catch (e) {
  await finish(1, `error ${e.message}`);
}
