// The three-policy check of a money route (burst 2/s, money 5/min, api
// 300/min) done the way a Node service would with @upstash/ratelimit: one
// Ratelimit per policy, one limit() call per policy, default client
// settings (auto-pipelining, ephemeral cache). Run against the same
// Upstash-compatible server as stagepass's `ratelimit::bench`, it prints
// JSON with round trips per request (counted by the server's /__stats) and
// latency of the whole check.
//
//   node bench/ratelimit-js/bench.mjs --url http://127.0.0.1:8079 --token T [--iterations 2000]
//
// The packages are installed outside the repository (see README.md);
// RATELIMIT_JS_MODULES names that folder (default ~/.cache/stagepass/npm-ratelimit).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { homedir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { performance } from "node:perf_hooks";

const modules = process.env.RATELIMIT_JS_MODULES ?? join(homedir(), ".cache/stagepass/npm-ratelimit");
const require = createRequire(join(modules, "package.json"));
const { Ratelimit } = require("@upstash/ratelimit");
const { Redis } = require("@upstash/redis");

function args() {
  const out = { url: "http://127.0.0.1:8079", token: process.env.UPSTASH_SHIM_TOKEN, iterations: 2000 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === "--url") out.url = value;
    else if (flag === "--token") out.token = value;
    else if (flag === "--iterations") out.iterations = Number(value);
    else throw new Error(`unknown argument ${flag}`);
  }
  if (!out.token) throw new Error("--token is required");
  return out;
}

// Requests the server has served so far (the shim's counter).
async function served(url) {
  const res = await fetch(`${url}/__stats`);
  return (await res.json()).requests;
}

// Nearest-rank percentile, like the Rust side.
function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(Math.max(rank, 1), sorted.length) - 1];
}

function latency(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  return { p50_ms: percentile(sorted, 50), p99_ms: percentile(sorted, 99) };
}

function limiters(redis, prefix) {
  // Same identifiers as stagepass (`{policy}:{subject}`), so the keys match.
  const make = (limiter) => new Ratelimit({ redis, limiter, prefix, analytics: false });
  return [
    ["burst", make(Ratelimit.tokenBucket(2, "1 s", 2))],
    ["money", make(Ratelimit.slidingWindow(5, "60 s"))],
    ["api", make(Ratelimit.slidingWindow(300, "60 s"))],
  ];
}

// One limit() per policy, in turn, stopping at the first refusal.
async function sequential(policies, id) {
  for (const [name, limiter] of policies) {
    const r = await limiter.limit(`${name}:${id}`);
    if (!r.success) return false;
  }
  return true;
}

// All three at once (auto-pipelined into one request, but not atomic: a
// refusal by one still spends the others).
async function parallel(policies, id) {
  const results = await Promise.all(policies.map(([name, limiter]) => limiter.limit(`${name}:${id}`)));
  return results.every((r) => r.success);
}

async function scenario(url, check, policies, n) {
  // Warm-up: connections, script cache.
  for (let i = 0; i < Math.ceil(n / 10); i++) await check(policies, randomUUID());
  let before = await served(url);
  const samples = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    if (!(await check(policies, randomUUID()))) throw new Error("a fresh user was refused");
    samples.push(performance.now() - started);
  }
  const allowedTrips = ((await served(url)) - before) / n;

  // A caller already refused by burst.
  const id = randomUUID();
  for (let i = 0; i < 3; i++) await check(policies, id);
  before = await served(url);
  const blockedSamples = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    if (await check(policies, id)) throw new Error("a blocked caller was allowed");
    blockedSamples.push(performance.now() - started);
  }
  const blockedTrips = ((await served(url)) - before) / n;
  // The blocked caller had 2 requests allowed: 3 of its 5 money units
  // should be left. Less means refused requests spent quota.
  const money = policies.find(([name]) => name === "money")[1];
  const { remaining } = await money.getRemaining(`money:${id}`);
  return {
    round_trips_per_request: allowedTrips,
    ...latency(samples),
    round_trips_per_blocked_request: blockedTrips,
    blocked: latency(blockedSamples),
    blocked_caller_money_remaining: remaining,
  };
}

async function main() {
  const { url, token, iterations } = args();
  const redis = new Redis({ url, token });
  const prefix = `bench-js:${randomUUID()}`;
  // Separate limiter instances per scenario: each has its own ephemeral cache.
  const seq = await scenario(url, sequential, limiters(redis, `${prefix}:seq`), iterations);
  const par = await scenario(url, parallel, limiters(redis, `${prefix}:par`), iterations);
  const version = (name) =>
    JSON.parse(readFileSync(join(modules, "node_modules", name, "package.json"), "utf8")).version;
  const versions = {
    "@upstash/ratelimit": version("@upstash/ratelimit"),
    "@upstash/redis": version("@upstash/redis"),
    node: process.version,
  };
  const report = {
    library: versions,
    iterations,
    policies: ["burst", "money", "api"],
    // The headline numbers: one limit() per policy, in turn.
    round_trips_per_request: seq.round_trips_per_request,
    p50_ms: seq.p50_ms,
    p99_ms: seq.p99_ms,
    sequential: seq,
    promise_all: par,
  };
  console.log(JSON.stringify(report, null, 2));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
