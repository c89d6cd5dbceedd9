// Drives a running ComfyUI in headless Chromium (Debian's /usr/bin/chromium through playwright-core).
// Started by run_browser_test.py, which owns the server; this file only talks to the page.
//
//   node browser_test.mjs <config.json>
//
// config.mode "build": build the example workflows from workflow_specs.mjs in the live frontend
//   (real node definitions, so widget order and links are what the frontend itself writes)
//   and save them into config.workflowsDir.
// config.mode "check": load every workflow in config.workflowsDir, check that each node type is
//   registered and the graph converts to a prompt.
// config.mode "run": load config.workflow, apply config.overrides (tiny checkpoint, 64x64,
//   few steps), queue it, wait for the SD Accel badges to reach a final state, save screenshots.
//   Then again with config.rerun (must not recompile), and, where the frontend has the Nodes 2.0
//   renderer (setting Comfy.VueNodes.Enabled), once more with it on: the badges must show in its
//   DOM, which renders them once and re-reads them only when told they changed, and a click on
//   the badge must show the fallback reasons (not drawn under a Nodes 2.0 node) as a toast.
// Prints one JSON line "RESULT {...}" for the runner.
import { readFileSync, writeFileSync, readdirSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { SPECS } from "./workflow_specs.mjs";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"];
const FINAL = /^(✓|⚠|✗)/;
const RATE = /\d (it\/s|s\/it)/;

async function openComfy() {
  const browser = await chromium.launch({ executablePath: cfg.chromium ?? "/usr/bin/chromium", args: FLAGS, headless: true });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const log = [];
  page.on("console", (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => log.push(`[pageerror] ${(e.stack ?? e.message).split("\n").slice(0, 4).join(" | ")}`));
  await page.goto(cfg.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app;
    return app?.graph && window.LiteGraph?.registered_node_types?.SDAccelCompileUNet;
  }, null, { timeout: 180_000 });
  await page.waitForTimeout(1500); // let the frontend finish its own first graph load
  return { browser, page, log };
}

// --- build -----------------------------------------------------------------------------------

async function build(page) {
  mkdirSync(cfg.workflowsDir, { recursive: true });
  const written = [];
  for (const [name, spec] of Object.entries(SPECS)) {
    const missing = await page.evaluate((types) => types.filter((t) => !window.LiteGraph.registered_node_types[t]), spec.nodes.map((n) => n.type));
    if (missing.length) {
      written.push({ name, skipped: `node types not registered: ${missing.join(", ")}` });
      continue;
    }
    const wf = await page.evaluate((spec) => {
      const app = window.comfyAPI.app.app;
      const LG = window.LiteGraph;
      app.graph.clear();
      const made = {};
      for (const n of spec.nodes) {
        const node = LG.createNode(n.type);
        node.pos = [40 + n.at[0] * 330, 110 + n.at[1] * 170];
        if (n.title) node.title = n.title;
        app.graph.add(node);
        for (const [wname, value] of Object.entries(n.widgets ?? {})) {
          const w = node.widgets?.find((x) => x.name === wname);
          if (!w) throw new Error(`${n.type} has no widget ${wname}`);
          w.value = value;
        }
        made[n.id] = node;
      }
      for (const n of spec.nodes) {
        for (const [input, [src, slot]] of Object.entries(n.inputs ?? {})) {
          const link = made[src].connect(slot, made[n.id], input);
          if (!link) throw new Error(`could not connect ${src}:${slot} -> ${n.id}.${input}`);
        }
      }
      const wf = app.graph.serialize();
      // A view that shows the whole chain, badges included, in a 1600x1000 window.
      wf.extra = { ...(wf.extra ?? {}), ds: { scale: 0.62, offset: [90, 120] } };
      return wf;
    }, spec);
    writeFileSync(join(cfg.workflowsDir, `${name}.json`), `${JSON.stringify(wf, null, 2)}\n`);
    written.push({ name, nodes: wf.nodes.length, links: wf.links.length });
  }
  return { written };
}

// --- check -----------------------------------------------------------------------------------

async function check(page) {
  const results = [];
  for (const file of readdirSync(cfg.workflowsDir).filter((f) => f.endsWith(".json")).sort()) {
    const wf = JSON.parse(readFileSync(join(cfg.workflowsDir, file), "utf8"));
    const r = await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      const missing = wf.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
      await app.loadGraphData(wf);
      const prompt = await app.graphToPrompt();
      const classes = Object.values(prompt.output).map((n) => n.class_type);
      // A node whose constructor threw loads as an empty placeholder: no comfyClass, no class_type.
      const broken = app.graph._nodes.filter((n) => !n.comfyClass).map((n) => n.type);
      return { missing, broken, nodes: app.graph._nodes.length, promptNodes: classes.filter(Boolean).length, classes };
    }, wf);
    results.push({ file, ...r });
  }
  return { workflows: results };
}

// --- run -------------------------------------------------------------------------------------

async function ourBadges(page) {
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    return app.graph._nodes.filter((n) => (n.comfyClass ?? n.type).startsWith("SDAccel")).map((n) => ({
      id: String(n.id), type: n.comfyClass ?? n.type,
      badges: (n.badges ?? []).map((b) => (typeof b === "function" ? b() : b)).map((b) => b?.text ?? "").filter(Boolean),
    }));
  });
}

async function toasts(page) {
  return page.evaluate(() => [...document.querySelectorAll(".p-toast-message")].map((el) => el.innerText.replace(/\s+/g, " ").trim()));
}

// Nodes 2.0: the text of each of our nodes' DOM element (badges included), by node id.
async function domTexts(page) {
  return page.evaluate(() => Object.fromEntries(window.comfyAPI.app.app.graph._nodes
    .filter((n) => (n.comfyClass ?? n.type).startsWith("SDAccel"))
    .map((n) => [String(n.id), document.querySelector(`[data-node-id="${n.id}"]`)?.innerText.replace(/\s+/g, " ") ?? null])));
}

async function setWidgets(page, overrides) {
  await page.evaluate((overrides) => {
    const app = window.comfyAPI.app.app;
    for (const node of app.graph._nodes) {
      for (const [wname, value] of Object.entries(overrides[node.comfyClass ?? node.type] ?? {})) {
        const w = node.widgets?.find((x) => x.name === wname);
        // setValue is what a user's edit runs (callbacks; 1.49 clears the missing-model mark there).
        if (w?.setValue) w.setValue(value, { node, canvas: app.canvas });
        else if (w) w.value = value;
      }
    }
    app.graph.setDirtyCanvas(true, true);
  }, overrides ?? {});
}

// Queue the open graph once and wait for the prompt to end and the Compile UNet badge to settle.
async function queueAndWait(page, label) {
  const t0 = Date.now();
  const first = await page.evaluate(() => {
    window.__sdaccelTest.done = null;
    return window.__sdaccelTest.events.length;
  });
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  let sawCompiling = null;
  let final = null;
  const seenToasts = new Set(); // a toast lives 5-12 s: collect them while the run goes
  while (Date.now() - t0 < cfg.timeoutS * 1000) {
    await page.waitForTimeout(1000);
    for (const t of await toasts(page)) seenToasts.add(t);
    const badges = await ourBadges(page);
    const compiling = badges.find((b) => b.badges.some((t) => t.includes("compiling")));
    if (compiling && !sawCompiling) {
      sawCompiling = { ...compiling, afterS: (Date.now() - t0) / 1000, texts: [] };
      await page.screenshot({ path: join(cfg.outDir, `${label}-compiling.png`) });
    }
    // The compiling badge counts seconds (and blocks): keep what it showed over time.
    const text = compiling?.badges.find((t) => t.includes("compiling"));
    if (text && sawCompiling.texts.at(-1) !== text && sawCompiling.texts.length < 200) sawCompiling.texts.push(text);
    const done = await page.evaluate(() => window.__sdaccelTest.done);
    const compileNode = badges.find((b) => b.type === "SDAccelCompileUNet");
    const settled = !compileNode || compileNode.badges.some((t) => FINAL.test(t) && RATE.test(t));
    if (done && (settled || done.name !== "execution_success")) {
      final = { done: done.name, error: done.detail?.exception_message, badges };
      break;
    }
  }
  await page.waitForTimeout(300);
  for (const t of await toasts(page)) seenToasts.add(t);
  await page.screenshot({ path: join(cfg.outDir, `${label}.png`) });
  await page.screenshot({ path: join(cfg.outDir, `${label}-chain.png`), clip: { x: 60, y: 95, width: 1340, height: 180 } });
  const events = await page.evaluate((first) => window.__sdaccelTest.events.slice(first).map((e) => ({ name: e.name, detail: e.detail })), first);
  return { seconds: (Date.now() - t0) / 1000, sawCompiling, final, toasts: [...seenToasts], events };
}

async function run(page) {
  const wf = JSON.parse(readFileSync(cfg.workflow, "utf8"));
  await page.evaluate(async (wf) => {
    const api = window.comfyAPI.api.api;
    window.__sdaccelTest = { events: [], done: null };
    const names = ["execution_success", "execution_error", "execution_interrupted",
      ...["node_applied", "compile_start", "compile_progress", "compile_end", "fallback", "lora_swap", "run_stats", "deepcache_stats"].map((e) => `sdaccel.${e}`)];
    for (const name of names) {
      api.addEventListener(name, (e) => {
        window.__sdaccelTest.events.push({ name, t: Date.now(), detail: e.detail });
        if (name.startsWith("execution_")) window.__sdaccelTest.done = { name, detail: e.detail };
      });
    }
    await window.comfyAPI.app.app.loadGraphData(wf);
  }, wf);
  await setWidgets(page, cfg.overrides);
  await page.screenshot({ path: join(cfg.outDir, "loaded.png") });
  const first = await queueAndWait(page, "final");
  if (!first.final || first.final.done !== "execution_success" || !cfg.rerun) return { ...first, rerun: null };
  // The same graph again with another seed and LoRA strength: no recompile expected.
  await setWidgets(page, cfg.rerun);
  const rerun = await queueAndWait(page, "rerun");
  if (!rerun.final) return { ...first, rerun, vue: null };
  const canvasClick = await clickCanvasBadge(page);
  return { ...first, rerun, canvasClick, vue: cfg.vueRun ? await vueRun(page, wf) : null };
}

// The fallback a partial compile reports, played in the page for the compile node `id` (the
// tiny UNet compiles whole on the CPU with FP16 Cast, so a real one does not happen here).
async function playFallback(page) {
  return page.evaluate(() => {
    const node = window.comfyAPI.app.app.graph._nodes.find((n) => n.comfyClass === "SDAccelCompileUNet");
    window.comfyAPI.api.api.dispatchEvent(new CustomEvent("sdaccel.fallback", { detail: {
      nodes: { compile: String(node.id) }, report: { status: "partial", requested: "auto", backend: "inductor", mode: "default",
        units_compiled: 3, whole_error: "played by the browser test", fallbacks: { "input_blocks.1": "reason played by the browser test" } },
    } }));
    return String(node.id);
  });
}

// Toasts that appear within a moment of `act`.
async function toastsAfter(page, act, shot) {
  const shown = new Set(await toasts(page));
  await act();
  await page.waitForTimeout(800);
  const added = (await toasts(page)).filter((t) => !shown.has(t));
  await page.screenshot({ path: join(cfg.outDir, shot) });
  return added;
}

// Classic canvas: where the frontend's badges take clicks (an LGraphBadge has an onClick
// slot, 1.49), a click on the partial badge must show the reasons.
async function clickCanvasBadge(page) {
  const clickable = await page.evaluate(() => {
    const LGraphBadge = window.LGraphBadge;
    return typeof LGraphBadge === "function" && Object.hasOwn(new LGraphBadge({ text: "" }), "onClick");
  });
  if (!clickable) return { skipped: "this frontend's canvas badges take no clicks" };
  const id = await playFallback(page);
  await page.waitForTimeout(1200); // drawn at least once, so the badge knows where it is
  const at = await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((n) => String(n.id) === id);
    const badge = node.badges.map((b) => (typeof b === "function" ? b() : b)).find((b) => b.text?.startsWith("⚠ partial"));
    if (!badge) return null;
    const [x, y, w, h] = badge.boundingRect;
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x + w / 2, node.pos[1] + y + h / 2]);
    const r = app.canvas.canvas.getBoundingClientRect();
    return { x: r.left + cx, y: r.top + cy };
  }, id);
  if (!at) return { error: "the partial badge is not on the compile node" };
  return { toasts: await toastsAfter(page, () => page.mouse.click(at.x, at.y), "canvas-click.png"), at };
}

// The workflow loaded afresh (no SD Accel state in the tab) under Nodes 2.0 and queued with
// another seed: the badges must reach the DOM. Skipped where users cannot turn Nodes 2.0 on.
async function vueRun(page, wf) {
  const skipped = await page.evaluate(async () => {
    const setting = window.comfyAPI.app.app.extensionManager?.setting;
    const def = setting?.settings?.["Comfy.VueNodes.Enabled"];
    if (!def) return "this frontend has no Comfy.VueNodes.Enabled setting";
    // 1.27 has it hidden (a developer toggle whose nodes draw no badges at all); users reach it where it is shown.
    if (def.type === "hidden") return "Comfy.VueNodes.Enabled is a hidden setting in this frontend";
    await setting.set("Comfy.VueNodes.Enabled", true);
    return null;
  });
  if (skipped) return { skipped };
  await page.evaluate((wf) => window.comfyAPI.app.app.loadGraphData(wf), wf);
  await page.waitForFunction(() => document.querySelector("[data-node-id]"), null, { timeout: 30_000 });
  const overrides = { ...cfg.overrides };
  for (const [type, widgets] of Object.entries(cfg.vueRun)) overrides[type] = { ...overrides[type], ...widgets };
  await setWidgets(page, overrides);
  const before = await domTexts(page);
  const run = await queueAndWait(page, "vue");
  await page.waitForTimeout(700); // Vue renders on its next tick
  const dom = await domTexts(page);
  const badgesNow = await ourBadges(page);
  return { ...run, domBefore: before, dom, badgesNow, click: await clickForReasons(page) };
}

// Nodes 2.0 draws no reason lines under the node; a click on the badge shows them as a toast.
async function clickForReasons(page) {
  const id = await playFallback(page);
  const badge = page.locator(`[data-node-id="${id}"]`).getByText("⚠ partial", { exact: false }).first();
  try {
    await badge.waitFor({ timeout: 5000 });
  } catch {
    return { error: "the partial badge did not show in the node's HTML" };
  }
  return { toasts: await toastsAfter(page, () => badge.click(), "vue-click.png") };
}

const { browser, page, log } = await openComfy();
let result;
try {
  const frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  const extensionLoaded = await page.evaluate(() => (window.comfyAPI.app.app.extensions ?? []).some((e) => e.name === "sdaccel.status"));
  const body = cfg.mode === "build" ? await build(page) : cfg.mode === "check" ? await check(page) : await run(page);
  result = { ok: true, frontend, extensionLoaded, ...body };
} catch (e) {
  await page.screenshot({ path: join(cfg.outDir, "error.png") }).catch(() => {});
  result = { ok: false, error: String(e?.stack ?? e) };
} finally {
  result.console = log.filter((l) => /sdaccel|SD Accel|error/i.test(l)).slice(-40);
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
