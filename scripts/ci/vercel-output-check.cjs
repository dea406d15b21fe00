// Checks what `vercel build` wrote to <work>/.vercel/output (Vercel's Build
// Output API v3) against the repository: one function per api/**/*.rs running
// the right Cargo binary, dynamic segments routed as Vercel documents them,
// vercel.json's rewrites and crons present, no repository file served as a
// static asset. Run by scripts/ci/vercel-build.sh:
//   node vercel-output-check.cjs <work dir> <builder dir>
// Exits non-zero with every problem listed.
'use strict';

const fs = require('fs');
const path = require('path');

const [work, builderDir] = process.argv.slice(2).map((p) => p && path.resolve(p));
if (!work || !builderDir) {
  console.error('usage: vercel-output-check.cjs <work dir> <builder dir>');
  process.exit(2);
}
// The TOML parser @vercel/rust itself reads Cargo.toml with.
const toml = require(path.join(builderDir, 'node_modules', 'smol-toml'));

const out = path.join(work, '.vercel', 'output');
const problems = [];
const fail = (m) => problems.push(m);

function walk(dir, pred, acc = []) {
  if (!fs.existsSync(dir)) return acc;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (pred(e, p)) acc.push(p);
    if (e.isDirectory() && !e.name.endsWith('.func')) walk(p, pred, acc);
  }
  return acc;
}
const rel = (from, p) => path.relative(from, p).split(path.sep).join('/');

// What the repository declares.
const cargo = toml.parse(fs.readFileSync(path.join(work, 'Cargo.toml'), 'utf8'));
const binByPath = new Map((cargo.bin || []).map((b) => [b.path, b.name]));
const vercelJson = JSON.parse(fs.readFileSync(path.join(work, 'vercel.json'), 'utf8'));
const sources = walk(path.join(work, 'api'), (e) => e.isFile() && e.name.endsWith('.rs'))
  .map((p) => rel(work, p))
  .sort();

// 1. Exactly one function per source file, running that file's binary.
const funcs = walk(path.join(out, 'functions'), (e) => e.isDirectory() && e.name.endsWith('.func'))
  .map((p) => rel(path.join(out, 'functions'), p))
  .sort();
const expected = sources.map((s) => s.replace(/\.rs$/, '.func'));
for (const f of expected) if (!funcs.includes(f)) fail(`no function for ${f.replace(/\.func$/, '.rs')}`);
for (const f of funcs) if (!expected.includes(f)) fail(`unexpected function ${f}`);
const fnSettings = (vercelJson.functions || {})['api/**/*.rs'] || {};
for (const src of sources) {
  const dir = path.join(out, 'functions', src.replace(/\.rs$/, '.func'));
  const cfgPath = path.join(dir, '.vc-config.json');
  if (!fs.existsSync(cfgPath)) continue;
  const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
  const want = { runtime: 'executable', handler: 'executable', runtimeLanguage: 'rust' };
  for (const [k, v] of Object.entries(want)) {
    if (cfg[k] !== v) fail(`${src}: ${k} is ${JSON.stringify(cfg[k])}, want ${v}`);
  }
  for (const k of ['memory', 'maxDuration']) {
    if (fnSettings[k] !== undefined && cfg[k] !== fnSettings[k]) {
      fail(`${src}: ${k} is ${cfg[k]}, vercel.json says ${fnSettings[k]}`);
    }
  }
  // The executable: inside the .func directory, or (prebuilt output) a
  // filePathMap entry relative to the project root.
  const mapped = (cfg.filePathMap || {})[cfg.handler];
  const exe = mapped ? path.resolve(work, mapped) : path.join(dir, cfg.handler);
  const bin = binByPath.get(src);
  if (!bin) fail(`${src}: no [[bin]] in Cargo.toml`);
  if (!fs.existsSync(exe)) {
    fail(`${src}: executable ${exe} does not exist`);
    continue;
  }
  if ((fs.statSync(exe).mode & 0o111) === 0) fail(`${src}: ${exe} is not executable`);
  if (bin && path.basename(exe) !== bin) fail(`${src}: runs ${path.basename(exe)}, want ${bin}`);
}

// 2. Routing. Requests for a function's own path are served by the
// filesystem phase; everything else goes through config.json's routes in
// order (first match with a dest wins), which is where a dynamic segment
// becomes a query parameter.
const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
function route(urlPath) {
  for (const r of config.routes || []) {
    if (!r.src || r.dest === undefined) continue;
    const m = new RegExp(r.src).exec(urlPath);
    if (m) return r.dest.replace(/\$(\d+)/g, (_, n) => m[Number(n)] ?? '');
  }
  return null;
}
let dynamic = 0;
for (const src of sources.filter((s) => /\[[^\]]+\]/.test(s))) {
  dynamic += 1;
  const fnPath = '/' + src.replace(/\.rs$/, '');
  const names = [...src.matchAll(/\[([^\]]+)\]/g)].map((m) => m[1]);
  const sample = fnPath.replace(/\[([^\]]+)\]/g, (_, n) => `sample-${n}`);
  const want = `${fnPath}?${names.map((n) => `${n}=sample-${n}`).join('&')}`;
  const got = route(sample);
  if (got !== want) fail(`${sample} routes to ${got}, want ${want}`);
}
// A path that is no function is not silently sent to one.
const miss = route('/api/v1/classes/sample-id/unknown');
if (miss !== null) fail(`/api/v1/classes/sample-id/unknown routes to ${miss}, want a 404`);

for (const rw of vercelJson.rewrites || []) {
  const got = route(rw.source);
  if (got !== rw.destination) fail(`rewrite ${rw.source} → ${got}, want ${rw.destination}`);
}
const wantCrons = JSON.stringify(vercelJson.crons || []);
if (JSON.stringify(config.crons || []) !== wantCrons) {
  fail(`crons ${JSON.stringify(config.crons)} differ from vercel.json ${wantCrons}`);
}
for (const c of vercelJson.crons || []) {
  if (!sources.includes(`${c.path.slice(1)}.rs`)) fail(`cron ${c.path} has no function`);
}

// 3. Static files: only public/ (robots.txt). Without a public/ directory
// Vercel serves the project root, i.e. every source file of the repository.
const statics = walk(path.join(out, 'static'), (e) => e.isFile()).map((p) => rel(path.join(out, 'static'), p));
const publicFiles = walk(path.join(work, 'public'), (e) => e.isFile()).map((p) => rel(path.join(work, 'public'), p));
for (const s of statics) if (!publicFiles.includes(s)) fail(`static file served: /${s}`);

if (problems.length > 0) {
  console.error(`vercel build output: ${problems.length} problem(s):`);
  for (const p of problems) console.error(`  - ${p}`);
  process.exit(1);
}
console.log(
  `vercel build output OK: ${funcs.length} functions (one per api/**/*.rs, each its own binary), ` +
    `${dynamic} dynamic routes, ${(vercelJson.rewrites || []).length} rewrite(s), ` +
    `${(config.crons || []).length} crons, static: ${statics.join(', ') || 'none'}`,
);
