// The dashboard in a real browser: starts the fanmq binary (MQTT and admin
// HTTP on free ports), connects real MQTT.js clients, opens the dashboard
// in headless Debian Chromium (playwright-core), and asserts that the
// connection count it shows follows what the test did, live, without a
// reload. Saves a screenshot to target/dashboard.png (a CI artifact);
// with UPDATE_DOCS=1 also to docs/dashboard.png.
//
// Run: cargo build -p fanmq && (cd tests/node && npm ci && npm run test:dashboard)
// FANMQ_BIN overrides the binary (default: target/debug/fanmq, or
// $CARGO_TARGET_DIR/debug/fanmq).

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, copyFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import mqtt from "mqtt";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.FANMQ_BIN
  ?? path.join(process.env.CARGO_TARGET_DIR ?? path.join(ROOT, "target"), "debug", "fanmq");
/** Clients connected while the page is open (a climb for the docs shot). */
const CLIENTS = Number(process.env.CLIENTS ?? (process.env.UPDATE_DOCS ? 2000 : 50));
/** Pause between batches of 10 connections, ms. */
const RAMP_MS = process.env.UPDATE_DOCS ? 120 : 0;
/** Clients that leave afterwards, to see the page follow. */
const LEAVING = Math.floor(CLIENTS / 5);
/** Longest wait for anything (debug build, two cores, tests in parallel). */
const TIMEOUT_MS = 20_000;
/** Extra seconds of traffic before the screenshot (longer for the docs). */
const TRAFFIC_SECONDS = Number(process.env.TRAFFIC_SECONDS ?? (process.env.UPDATE_DOCS ? 20 : 3));

/** Starts fanmq; resolves with the process and its MQTT and HTTP ports. */
function startBroker() {
  const child = spawn(BIN, [
    "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
    "--shards", "2", "--log-level", "info",
  ], { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "" } });
  return new Promise((resolve, reject) => {
    let log = "";
    let mqttPort = null;
    const timer = setTimeout(() => reject(new Error("broker did not start:\n" + log)), TIMEOUT_MS);
    child.on("error", (e) => { clearTimeout(timer); reject(e); });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`broker exited (${code}):\n${log}`)); });
    child.stderr.on("data", (chunk) => {
      log += chunk;
      mqttPort ??= log.match(/ listening on 127\.0\.0\.1:(\d+)/)?.[1];
      const httpPort = log.match(/admin HTTP on http:\/\/127\.0\.0\.1:(\d+)\//)?.[1];
      if (mqttPort && httpPort) {
        clearTimeout(timer);
        child.removeAllListeners("exit");
        resolve({ child, mqttPort: Number(mqttPort), httpPort: Number(httpPort) });
      }
    });
  });
}

/** Connects one MQTT.js client; resolves once CONNACK arrived. */
function connect(port, clientId) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect({ host: "127.0.0.1", port, clientId, reconnectPeriod: 0, connectTimeout: TIMEOUT_MS });
    client.once("connect", () => resolve(client));
    client.once("error", reject);
  });
}

/** Ends a client with DISCONNECT and waits for the close. */
function end(client) {
  return new Promise((resolve) => client.end(false, {}, resolve));
}

test("the dashboard shows the live connection count", { timeout: 120_000 }, async () => {
  const broker = await startBroker();
  const userDataDir = mkdtempSync(path.join(tmpdir(), "fanmq-chromium-"));
  const clients = [];
  let context = null;
  let page = null;
  let traffic = null;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
      headless: true,
      args: [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
      ],
      viewport: { width: 1280, height: 820 },
    });
    page = context.pages()[0] ?? await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    // Everything the page loads must come from the broker itself (no CDN).
    const foreign = [];
    page.on("request", (r) => {
      if (!r.url().startsWith(`http://127.0.0.1:${broker.httpPort}/`)) foreign.push(r.url());
    });
    await page.goto(`http://127.0.0.1:${broker.httpPort}/`);

    // Clients connect (in batches of ten) while the page watches; a
    // publisher sends to all of them so the rate charts have data.
    const publisher = await connect(broker.mqttPort, "dash-publisher");
    clients.push(publisher);
    traffic = setInterval(() => {
      for (let k = 0; k < 20; k++) publisher.publish("dash/tick", "x".repeat(64));
    }, 100);
    for (let i = 1; i < CLIENTS; i += 10) {
      const batch = [];
      for (let j = i; j < Math.min(i + 10, CLIENTS); j++) batch.push(connect(broker.mqttPort, `dash-${j}`));
      const connected = await Promise.all(batch);
      await Promise.all(connected.map((c) => c.subscribeAsync("dash/#", { qos: 0 })));
      clients.push(...connected);
      if (RAMP_MS) await new Promise((r) => setTimeout(r, RAMP_MS));
    }
    assert.equal(clients.length, CLIENTS);

    const shown = async (n) => {
      await page.waitForFunction(
        (want) => document.getElementById("connections")?.textContent === String(want),
        n, { timeout: TIMEOUT_MS });
      return page.textContent("#connections");
    };
    assert.equal(await shown(CLIENTS), String(CLIENTS));

    // Clients leave: the page follows without a reload.
    const leaving = clients.splice(clients.length - LEAVING, LEAVING);
    await Promise.all(leaving.map(end));
    assert.equal(await shown(CLIENTS - LEAVING), String(CLIENTS - LEAVING));

    await page.waitForFunction(() => Number(document.getElementById("rate-out")?.dataset.value) > 0,
      null, { timeout: TIMEOUT_MS });
    await page.waitForTimeout(TRAFFIC_SECONDS * 1000);
    assert.match(await page.textContent("#status"), /^live/);
    assert.deepEqual(errors, []);
    assert.deepEqual(foreign, []);

    mkdirSync(path.join(ROOT, "target"), { recursive: true });
    const shot = path.join(ROOT, "target", "dashboard.png");
    await page.screenshot({ path: shot, fullPage: true });
    if (process.env.UPDATE_DOCS) copyFileSync(shot, path.join(ROOT, "docs", "dashboard.png"));
  } catch (e) {
    // What the page showed when it failed, for the CI artifacts.
    if (page) {
      mkdirSync(path.join(ROOT, "target"), { recursive: true });
      await page.screenshot({ path: path.join(ROOT, "target", "dashboard-failure.png") }).catch(() => {});
    }
    throw e;
  } finally {
    if (traffic) clearInterval(traffic);
    if (context) await context.close();
    await Promise.all(clients.map(end));
    broker.child.kill("SIGTERM");
    rmSync(userDataDir, { recursive: true, force: true });
  }
});
