// Unit tests for web/sdaccel_state.js (the badge / toast logic of the ComfyUI extension).
// Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

// web/ holds ESM under a .js name with no package.json to say so; the module has no imports
// (it must stay free of DOM / ComfyUI ones), so it loads as a data: URL on any node version.
const src = readFileSync(new URL("../../web/sdaccel_state.js", import.meta.url), "utf8");
const S = await import(`data:text/javascript;base64,${Buffer.from(src).toString("base64")}`);

const GRAPH = [
  { id: "3", type: "KSampler" },
  { id: "4", type: "SDAccelFP16Cast" },
  { id: "5", type: "SDAccelCompileUNet" },
  { id: "6", type: "SDAccelDeepCache" },
  { id: "7", type: "SDAccelLoRAHotSwap" },
];
const NODES = { cast: "4", compile: "5", deepcache: "6", lora: "7" };

function clock(start = 1_000_000) {
  const c = { t: start, now: () => c.t };
  return c;
}

const report = (over = {}) => ({
  requested: "auto", backend: "inductor", mode: "default", target: "UNetModel", status: "compiled",
  compile_seconds: 47.2, units_compiled: 0, whole_error: null, fallbacks: {}, ...over,
});

test("compile events go to the compile node named in the run's mapping", () => {
  assert.deepEqual(S.targetsFor("compile_start", { nodes: NODES }, GRAPH), ["5"]);
  assert.deepEqual(S.targetsFor("fallback", { nodes: { compile: "99" } }, GRAPH), [], "a node not in this graph");
});

test("without a mapping, compile events fall back to every compile node", () => {
  const graph = [...GRAPH, { id: "8", type: "SDAccelCompileUNet" }];
  assert.deepEqual(S.targetsFor("compile_end", { nodes: {} }, graph), ["5", "8"]);
});

test("run stats reach every SD Accel node of the run and an SD Accel sampler, never the KSampler", () => {
  const graph = [...GRAPH, { id: "9", type: "SDAccelLCMLoRASampler" }];
  assert.deepEqual(S.targetsFor("run_stats", { nodes: NODES, executing: "3" }, graph).sort(), ["4", "5", "6", "7"]);
  assert.deepEqual(S.targetsFor("run_stats", { nodes: {}, executing: "9" }, graph), ["9"]);
  assert.deepEqual(S.targetsFor("node_applied", { node: "6" }, graph), ["6"]);
  assert.deepEqual(S.targetsFor("unknown_event", { nodes: NODES }, graph), []);
});

test("a compile goes armed -> compiling (elapsed, blocks) -> partial, with reasons under the node", () => {
  const c = clock();
  const store = new S.StatusStore(c.now);
  store.apply("node_applied", { node: "5" }, GRAPH);
  assert.equal(S.badgeText(store.get("5"), c.t), "compiles on first run");

  store.apply("compile_start", { nodes: NODES, backend: "inductor", mode: "default", target: "UNetModel" }, GRAPH);
  c.t += 12_000;
  assert.equal(S.phaseOf(store.get("5")), "compiling");
  assert.equal(S.badgeText(store.get("5"), c.t), "◔ compiling inductor 12 s");
  assert.ok(store.anyCompiling());

  store.apply("compile_progress", { nodes: NODES, target: "UNetModel", done: 3, total: 12, whole_error: "Unsupported: open" }, GRAPH);
  assert.equal(S.badgeText(store.get("5"), c.t), "◔ compiling inductor 12 s · block 3/12");
  assert.match(S.detailLines(store.get("5"))[0], /whole UNet failed \(Unsupported: open\)/);

  const fb = report({ status: "partial", units_compiled: 10, whole_error: "Unsupported: open",
    fallbacks: { "input_blocks.1": "Unsupported: data-dependent branch", "middle_block": "BackendCompilerFailed: x",
      "output_blocks.2.1": "Unsupported: open [its 4 submodules compiled separately]" } });
  const { toast } = store.apply("fallback", { nodes: NODES, report: fb }, GRAPH);
  assert.equal(S.phaseOf(store.get("5")), "fallback");
  assert.equal(S.badgeText(store.get("5"), c.t), "⚠ partial: 10 compiled, 2 eager", "a split block is not counted as eager");
  assert.equal(S.badgeColors(store.get("5")).bg, "#f59e42");
  assert.deepEqual(S.detailLines(store.get("5")), [
    "whole UNet: Unsupported: open",
    "eager input_blocks.1: Unsupported: data-dependent branch",
    "eager middle_block: BackendCompilerFailed: x",
  ]);
  assert.equal(toast.severity, "warn");
  assert.equal(toast.summary, "SD Accel: 10 blocks compiled, 2 kept eager");
  assert.match(toast.detail, /input_blocks\.1: Unsupported/);
  assert.match(toast.detail, /1 block was split: their parts compiled separately/);
  assert.doesNotMatch(toast.detail, /output_blocks\.2\.1/);
  assert.ok(!store.anyCompiling());
});

test("a finished run shows it/s and the DeepCache hit ratio on the whole chain", () => {
  const store = new S.StatusStore(clock().now);
  store.apply("compile_start", { nodes: NODES, backend: "inductor", mode: "default", target: "UNetModel" }, GRAPH);
  store.apply("compile_end", { nodes: NODES, report: report() }, GRAPH);
  store.apply("run_stats", { nodes: NODES, executing: "3", steps: 4, seconds: 1.6, its: 2.5, compile_seconds_in_run: 47.2, report: report() }, GRAPH);
  store.apply("deepcache_stats", { nodes: NODES, executing: "3", hits: 2, full: 2, ratio: 0.5, disabled: null }, GRAPH);
  assert.equal(S.badgeText(store.get("5")), "✓ compiled inductor · 2.50 it/s · DeepCache 50%");
  assert.equal(S.badgeText(store.get("4")), "2.50 it/s · DeepCache 50%");
  assert.equal(S.badgeText(store.get("6")), "2.50 it/s · DeepCache 50%");
  assert.deepEqual(S.detailLines(store.get("5")), ["last run included 47 s of compiling"]);
  assert.equal(store.get("3"), undefined, "the KSampler is not ours");
});

test("a reloaded tab learns the compile state from run_stats", () => {
  const store = new S.StatusStore(clock().now);
  store.apply("run_stats", { nodes: NODES, steps: 20, seconds: 4, its: 5, compile_seconds_in_run: 0, report: report({ status: "eager", whole_error: "X: y" }) }, GRAPH);
  assert.equal(S.phaseOf(store.get("5")), "eager");
  assert.equal(S.badgeText(store.get("5")), "✗ not compiled (eager) · 5.00 it/s");
  assert.deepEqual(Object.keys(store.get("4").compiles), [], "the cast node does not claim the compile");
});

test("run_stats does not overwrite a compile still in flight (DeepCache's second path)", () => {
  const store = new S.StatusStore(clock().now);
  store.apply("compile_start", { nodes: NODES, backend: "inductor", mode: "default", target: "UNetModel [shallow]" }, GRAPH);
  store.apply("run_stats", { nodes: NODES, its: 1, report: report({ target: "UNetModel [shallow]", status: "pending" }) }, GRAPH);
  assert.equal(S.phaseOf(store.get("5")), "compiling");
});

test("a missing backend is named on the badge and under the node", () => {
  const store = new S.StatusStore(clock().now);
  store.apply("compile_end", { nodes: NODES, report: report({ requested: "onediff" }) }, GRAPH);
  assert.equal(S.badgeText(store.get("5")), "✓ compiled inductor (onediff not available)");
  assert.equal(S.detailLines(store.get("5"))[0], "onediff is not installed here; using inductor");
});

test("toasts: start, end, eager fallback, DeepCache off; repeats within 30 s are dropped", () => {
  const c = clock();
  const store = new S.StatusStore(c.now);
  const start = { nodes: NODES, backend: "inductor", mode: "default", target: "UNetModel" };
  assert.equal(store.apply("compile_start", start, GRAPH).toast.severity, "info");
  assert.equal(store.apply("compile_start", start, GRAPH).toast, null);
  c.t += 31_000;
  assert.notEqual(store.apply("compile_start", start, GRAPH).toast, null);
  const end = store.apply("compile_end", { nodes: NODES, report: report() }, GRAPH).toast;
  assert.deepEqual([end.severity, end.detail], ["success", "inductor (default) in 47 s."]);
  const broken = S.toastFor("compile_end", { report: report({ graph_breaks: { "call platform.mac_ver": 40, "psutil": 2 } }) });
  assert.equal(broken.severity, "warn");
  assert.equal(broken.summary, "SD Accel: UNet compiled with 42 graph breaks");
  assert.match(broken.detail, /runs eager[\s\S]*call platform.mac_ver \(x40\)\npsutil \(x2\)/);
  const store2 = new S.StatusStore(c.now);
  store2.apply("compile_end", { nodes: NODES, report: report({ graph_breaks: { "call platform.mac_ver": 40 } }) }, GRAPH);
  assert.equal(S.detailLines(store2.get("5"))[0], "40 graph break(s): call platform.mac_ver");
  const eager = S.toastFor("fallback", { report: report({ status: "eager", whole_error: "E: w" }) });
  assert.equal(eager.summary, "SD Accel: UNet not compiled, it runs eager");
  assert.equal(S.toastFor("run_stats", { its: 3 }), null);
  assert.equal(S.toastFor("deepcache_stats", { disabled: null }), null);
  assert.equal(S.toastFor("deepcache_stats", { disabled: "batch changed" }).severity, "warn");
});

test("long fallback lists are cut, in the toast and under the node", () => {
  const fallbacks = Object.fromEntries(Array.from({ length: 8 }, (_, i) => [`output_blocks.${i}`, "Unsupported: x"]));
  const t = S.toastFor("fallback", { report: report({ status: "partial", fallbacks }) });
  assert.equal(t.detail.split("\n").length, 6);
  assert.match(t.detail, /and 3 more/);
  const store = new S.StatusStore(clock().now);
  store.apply("fallback", { nodes: NODES, report: report({ status: "partial", fallbacks }) }, GRAPH);
  const lines = S.detailLines(store.get("5"));
  assert.equal(lines.length, 4);
  assert.equal(lines[3], "... 5 more in the console");
});

test("a LoRA swap shows on the LoRA node, and only there", () => {
  const store = new S.StatusStore(clock().now);
  const d = { nodes: NODES, loras: [{ name: "a.safetensors", strength: 0.8, layers: 56 }], layers_changed: 56, seconds: 0.12 };
  assert.deepEqual(store.apply("lora_swap", d, GRAPH).targets, ["7"]);
  store.apply("run_stats", { nodes: NODES, its: 2 }, GRAPH);
  assert.equal(S.badgeText(store.get("7")), "✓ LoRA swapped in 0.1 s · 2.00 it/s");
  assert.deepEqual(S.targetsFor("lora_swap", { nodes: {} }, GRAPH), ["7"], "no mapping: every LoRA node");
});

test("formatting", () => {
  assert.equal(S.formatRate(0.25), "4.00 s/it");
  assert.equal(S.formatRate(null), "");
  assert.equal(S.formatSeconds(3.21), "3.2 s");
  assert.equal(S.formatSeconds(185), "3 min 5 s");
  assert.equal(S.kindOf("SDAccelSomethingNew"), "other");
  assert.equal(S.isOurNodeType("KSampler"), false);
});

test("flattenGraph names subgraph nodes the way the server does", () => {
  const inner = { _nodes: [{ id: 2, comfyClass: "SDAccelCompileUNet" }] };
  const graph = { _nodes: [{ id: 1, type: "KSampler" }, { id: 12, type: "Sub", subgraph: inner }] };
  assert.deepEqual(S.flattenGraph(graph).map((n) => [n.id, n.type]), [["1", "KSampler"], ["12", "Sub"], ["12:2", "SDAccelCompileUNet"]]);
});

test("a click on the badge gets the reasons as a toast; nothing to say, no toast", () => {
  const store = new S.StatusStore(clock().now);
  store.apply("node_applied", { node: "5", nodes: NODES }, GRAPH);
  assert.equal(S.detailToast(store.get("5")), null);
  const fb = report({ status: "eager", whole_error: "Unsupported: open",
    fallbacks: Object.fromEntries(Array.from({ length: 8 }, (_, i) => [`input_blocks.${i}`, "Unsupported: open"])) });
  store.apply("fallback", { nodes: NODES, report: fb }, GRAPH);
  const t = S.detailToast(store.get("5"));
  assert.equal(t.severity, "warn");
  assert.equal(t.summary, "SD Accel: ✗ not compiled (eager)");
  assert.equal(t.detail.split("\n").length, 9, "more lines than under the node (4), the whole UNet's first");
  assert.match(t.detail, /^whole UNet: Unsupported: open\neager input_blocks\.0/);
});
